"""Rotary + KV-cache write into the q/k/v projection that feeds them:

    qkv = rms_norm_linear(x, ...)              (or add_rms_norm_linear(x, r, ...)[0])
    q, k, v = qkv.split([H*D, Hkv*D, Hkv*Dv]) each unflattened into heads
    q', k' = rotary_kv_write(q, k, v, positions, cos_sin, neox, layer)
 -> qkv = rms_norm_linear_rope(x, ..., positions, cos_sin, neox, layer, H, Hkv, D)
    (or add_rms_norm_linear_rope), whose q and k columns come out rotated, with k and v in the
    cache; q', k' are then the split's own q and k views.

Same numbers (the ops' references are the ops they replace, in a row). What it buys is on the
GPU: a batch-1 step's q/k/v gemv rotates its outputs and stores k and v in its epilogue
(`kernels/quant_gemm.py`), so rotary is no launch of its own. Runs after fuse_norm_linear and
fuse_rotary_cache_write, which make the two ops it joins. A model that normalizes q and k per
head before rotary (Qwen3) has ops between them, and is left alone.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from kiln.ir.graph import Graph, is_kiln_op

NAME = "fuse_linear_rope"

_FUSED = {"rms_norm_linear": torch.ops.kiln.rms_norm_linear_rope.default,
          "add_rms_norm_linear": torch.ops.kiln.add_rms_norm_linear_rope.default}


def _heads(view: fx.Node) -> tuple[fx.Node, int, int] | None:
    """(the split getitem it views, heads, head dim) of `x.unflatten(-1, (heads, dim))`."""
    is_unflatten = (view.op == "call_method" and view.target == "unflatten") or view.target is torch.unflatten
    if not is_unflatten or len(view.args) != 3 or view.args[1] != -1:
        return None
    shape = view.args[2]
    if not (isinstance(shape, (tuple, list)) and len(shape) == 2 and all(isinstance(n, int) for n in shape)):
        return None
    part = view.args[0]
    if not (isinstance(part, fx.Node) and part.target is operator.getitem and len(part.users) == 1):
        return None
    return part, shape[0], shape[1]


def _split_sizes(split: fx.Node) -> list | None:
    """The sizes of `x.split([..], dim=-1)`, else None."""
    is_split = (split.op == "call_method" and split.target == "split") or split.target is torch.split
    dim = split.kwargs.get("dim", split.args[2] if len(split.args) > 2 else 0)
    if not is_split or dim != -1 or not isinstance(split.args[1], (list, tuple)):
        return None
    return list(split.args[1])


def _projection(node: fx.Node) -> tuple[fx.Node, str] | None:
    """(the fused norm + linear op whose output `node` is, its name)."""
    if is_kiln_op(node, "rms_norm_linear") and len(node.args) == 6:
        return node, "rms_norm_linear"
    if node.target is operator.getitem and node.args[1] == 0 and is_kiln_op(node.args[0], "add_rms_norm_linear"):
        return node.args[0], "add_rms_norm_linear"
    return None


def run(graph: Graph) -> Graph:
    g = graph.graph
    for rot in list(graph.calls("rotary_kv_write")):
        q, k, v, positions, cos_sin, is_neox, layer = rot.args
        views = [_heads(n) if isinstance(n, fx.Node) else None for n in (q, k, v)]
        if None in views or len(q.users) != 1 or len(k.users) != 1:
            continue  # (the unrotated q and k must be read by the rotary alone: they become the rotated ones)
        parts = [part for part, _, _ in views]
        split = parts[0].args[0]
        if any(p.args[0] is not split for p in parts) or [p.args[1] for p in parts] != [0, 1, 2]:
            continue
        (_, heads, dim), (_, kv_heads, k_dim), (_, v_heads, v_dim) = views
        sizes = _split_sizes(split)
        if sizes != [heads * dim, kv_heads * k_dim, v_heads * v_dim] or k_dim != dim or v_heads != kv_heads:
            continue
        found = _projection(split.args[0])
        if found is None or len(split.args[0].users) != 1:
            continue
        projection, name = found
        if any(isinstance(a, fx.Node) and a.op not in ("placeholder", "get_attr") for a in (positions, cos_sin)):
            continue  # (the fused op takes the projection's place: its extra inputs must exist by then)
        with g.inserting_before(projection):
            fused = g.call_function(_FUSED[name], (*projection.args, positions, cos_sin, is_neox, layer, heads,
                                                   kv_heads, dim))
        fused.meta["example_value"] = projection.meta.get("example_value")
        projection.replace_all_uses_with(fused)
        for user in list(rot.users):  # the rotated q and k: now the split's views of the fused output
            user.replace_all_uses_with(q if user.args[1] == 0 else k)
        g.erase_node(projection)
    return graph.finish()
