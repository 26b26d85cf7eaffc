"""RMSNorm into the linear that reads it: a norm whose normalized output only a `linear`,
`merged_linear` or `weight_only_linear` reads becomes one op with it.

    merged_linear(rms_norm(x), ws, bs)            -> rms_norm_linear(x, ..., ws, bs)
    merged_linear(add_rms_norm(x, r)[0], ws, bs)  -> add_rms_norm_linear(x, r, ..., ws, bs)
                                                     (the sum stays output [1])

Same numbers everywhere (the ops' references are the two ops in a row). What it buys is on the
GPU: a batch-1 step's gemv normalizes its input row itself (`kernels/quant_gemm.py`), so the norm
is no launch of its own; a Llama layer's two norms feed the QKV and gate/up projections this way.
Runs after fuse_add_rms_norm (which makes the add_rms_norm it folds).
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from kiln.ir.graph import Graph, is_kiln_op

NAME = "fuse_norm_linear"


_LINEARS = ("linear", "merged_linear", "weight_only_linear")


def linear_reading(node: fx.Node) -> fx.Node | None:
    """The node's one user, when it is a linear (float, or weight-only 8-bit) taking the node as
    its input."""
    users = list(node.users)
    if len(users) != 1 or users[0].kwargs:
        return None
    user = users[0]
    if any(is_kiln_op(user, name) for name in _LINEARS) and user.args[0] is node:
        return user
    return None


def linear_args(linear: fx.Node) -> tuple[list, list, fx.Node | None]:
    """(weights, biases, w_scale) of a linear_reading node, as the fused ops take them."""
    if is_kiln_op(linear, "merged_linear"):
        return list(linear.args[1]), list(linear.args[2]), None
    if is_kiln_op(linear, "weight_only_linear"):
        _, wq, w_scale, bias = linear.args
        return [wq], [bias] if bias is not None else [], w_scale
    bias = linear.args[2] if len(linear.args) > 2 else None
    return [linear.args[1]], [bias] if bias is not None else [], None


def hoist_before(values, node: fx.Node, order: dict) -> bool:
    """Whether every value is defined before `node`, once the constants among them (get_attr
    nodes, which read nothing: the quantize pass puts its 8-bit weights right before their
    linear) are moved up to just before it."""
    later = [v for v in values if isinstance(v, fx.Node) and order[v] > order[node]]
    if any(v.op != "get_attr" for v in later):
        return False
    for v in later:
        node.prepend(v)
        order[v] = order[node] - 0.5
    return True


def run(graph: Graph) -> Graph:
    g = graph.graph
    order = {n: i for i, n in enumerate(g.nodes)}
    for norm in list(graph.calls("rms_norm")):
        linear = linear_reading(norm)
        if linear is None or norm.kwargs:
            continue
        weights, biases, w_scale = linear_args(linear)
        with g.inserting_before(linear):
            fused = g.call_function(torch.ops.kiln.rms_norm_linear.default, (*norm.args, weights, biases, w_scale))
        fused.meta["example_value"] = linear.meta.get("example_value")
        linear.replace_all_uses_with(fused)
    for norm in list(graph.calls("add_rms_norm")):
        outputs = {user.args[1]: user for user in norm.users if user.target is operator.getitem}
        if 0 not in outputs or len(outputs) != len(norm.users) or norm.kwargs:
            continue
        linear = linear_reading(outputs[0])
        if linear is None:
            continue
        weights, biases, w_scale = linear_args(linear)
        # the fused op takes the norm's place (the sum's readers may come before the linear), so
        # the linear's weights must exist by then (parameters are graph inputs: they do)
        if not hoist_before(weights + biases + [w_scale], norm, order):
            continue
        with g.inserting_after(norm):
            fused = g.call_function(torch.ops.kiln.add_rms_norm_linear.default,
                                    (*norm.args, weights, biases, w_scale))
        with g.inserting_after(fused):
            out = g.call_function(operator.getitem, (fused, 0))
            summed = g.call_function(operator.getitem, (fused, 1))
        out.meta["example_value"] = linear.meta.get("example_value")
        if 1 in outputs:
            summed.meta["example_value"] = outputs[1].meta.get("example_value")
            outputs[1].replace_all_uses_with(summed)
        linear.replace_all_uses_with(out)
    return graph.finish()
