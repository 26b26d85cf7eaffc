"""Activation fusion: `act(a) * b`, where a and b are the two halves of one tensor (a merged
gate/up projection), becomes one `silu_and_mul` / `gelu_and_mul` over that tensor."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F

from kiln.ir.graph import Graph, is_kiln_op

NAME = "fuse_activation"
_SILU = (F.silu, torch.ops.aten.silu.default)
_GELU = (F.gelu, torch.ops.aten.gelu.default)


def run(graph: Graph) -> Graph:
    for node in list(graph.graph.nodes):
        if node.op != "call_function" or node.target not in (operator.mul, torch.mul):
            continue
        act, up = node.args[0], node.args[1]
        kind = _activation(act)
        if kind is None or not isinstance(up, torch.fx.Node):
            continue
        halves = _halves(act.args[0], up)
        if halves is None:
            continue
        with graph.graph.inserting_before(node):
            if kind == "silu":
                fused = graph.graph.call_function(torch.ops.kiln.silu_and_mul.default, (halves,))
            else:
                fused = graph.graph.call_function(torch.ops.kiln.gelu_and_mul.default, (halves, kind[5:] or "none"))
        fused.meta["example_value"] = node.meta.get("example_value")
        node.replace_all_uses_with(fused)
    return graph.finish()


def _activation(node) -> str | None:
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return None
    if node.target in _SILU:
        return "silu"
    if node.target in _GELU:
        approximate = node.kwargs.get("approximate", "none")
        return "gelu_" + approximate if approximate != "none" else "gelu_"
    if is_kiln_op(node, "activation") and node.args[1] in ("silu", "gelu", "gelu_tanh"):
        return {"silu": "silu", "gelu": "gelu_", "gelu_tanh": "gelu_tanh"}[node.args[1]]
    return None


def _halves(a, b):
    """The tensor whose last dim splits evenly into a (first half) and b (second half)."""
    if not all(isinstance(n, torch.fx.Node) and n.op == "call_function" and n.target is operator.getitem for n in (a, b)):
        return None
    split = a.args[0]
    if b.args[0] is not split or (a.args[1], b.args[1]) != (0, 1) or split.op != "call_function":
        return None
    pieces = split.meta.get("example_value")
    if pieces is not None:
        if not isinstance(pieces, (tuple, list)) or len(pieces) != 2 or pieces[0].shape != pieces[1].shape:
            return None
    else:  # a split a pass made: read its sizes
        sizes = split.args[1] if len(split.args) > 1 else None
        if not isinstance(sizes, (list, tuple)) or len(sizes) != 2 or sizes[0] != sizes[1]:
            return None
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    source = split.args[0]
    rank = source.meta["example_value"].dim() if "example_value" in source.meta else None
    if (rank is None and dim != -1) or (rank is not None and dim % rank != rank - 1):
        return None
    return source
