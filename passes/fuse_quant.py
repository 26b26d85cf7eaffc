"""Activation quantization folded into the op before it: a per-token `quantize` whose input is
only read by it becomes part of that op, so the unquantized activations never go to memory.

    quantize(rms_norm(x))            -> rms_norm_quant(x)
    quantize(add_rms_norm(x, r)[0])  -> add_rms_norm_quant(x, r)   (the sum stays output [2])
    quantize(silu_and_mul(x))        -> silu_and_mul_quant(x)

Runs after the quantize pass (which makes the `quantize` calls of W8A8 GEMMs) and after the norm
and activation fusions (which make the ops it folds into).
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from kiln.ir.graph import Graph, is_kiln_op

NAME = "fuse_quant"


def _only_user(node: fx.Node, user: fx.Node) -> bool:
    return list(node.users) == [user]


def run(graph: Graph) -> Graph:
    g = graph.graph
    for quant in list(graph.calls("quantize")):
        src, kind = quant.args
        if not isinstance(src, fx.Node) or not _only_user(src, quant):
            continue
        if is_kiln_op(src, "rms_norm") or is_kiln_op(src, "silu_and_mul"):
            target = torch.ops.kiln.rms_norm_quant if is_kiln_op(src, "rms_norm") else torch.ops.kiln.silu_and_mul_quant
            with g.inserting_before(quant):
                fused = g.call_function(target.default, (*src.args, kind))
            quant.replace_all_uses_with(fused)
        elif (src.target is operator.getitem and src.args[1] == 0 and is_kiln_op(src.args[0], "add_rms_norm")):
            norm = src.args[0]
            with g.inserting_after(norm):
                fused = g.call_function(torch.ops.kiln.add_rms_norm_quant.default, (*norm.args, kind))
            with g.inserting_after(fused):
                summed = g.call_function(operator.getitem, (fused, 2))
            for user in list(norm.users):  # the sum, read by the next residual add
                if user.target is operator.getitem and user.args[1] == 1:
                    user.replace_all_uses_with(summed)
            quant.replace_all_uses_with(fused)
    return graph.finish()
