"""A row-parallel linear and the all_reduce that sums its partial products, as one op:

    all_reduce(linear(x, w, b))                   -> linear_all_reduce(x, "", [w], [b], None)
    all_reduce(merged_linear(x, ws, bs))          -> linear_all_reduce(x, "", ws, bs, None)
    all_reduce(weight_only_linear(x, wq, s, b))   -> linear_all_reduce(x, "", [wq], [b], s)
    all_reduce(act_and_mul_linear(x, a, ws, bs, s)) -> linear_all_reduce(x, a, ws, bs, s)

where the all_reduce is the linear's only reader (a tensor-parallel model's attention output and
MLP down projections: `models/parallel.py`'s RowParallelLinear). Same numbers (the op's reference
is the two ops in a row). What it is for is on two GPUs: a batch-1 step's gemv programs send
their values to the peer rank as they store them, and the all-reduce launch after the gemv only
receives and sums (`kernels/quant_gemm.py`, `reduced_gemv`), so the row crosses NVLink while the
gemv still runs: the Llama-3.1-8B TP=2 step 5-6% faster on two H100s (codegen/NOTES.md, session
23). `triton_ops.FUSED_ALL_REDUCE` turns that off (the gemv, then the all-reduce kernel). Runs
after fuse_activation_linear (which makes the gated form) and quantize (the weight-only one).
"""

from __future__ import annotations

import torch
from torch import fx

from kiln.ir.graph import Graph, is_kiln_op
from kiln.passes.fuse_norm_linear import linear_args

NAME = "fuse_linear_all_reduce"


def run(graph: Graph) -> Graph:
    g = graph.graph
    for reduce in list(graph.calls("all_reduce")):
        linear = reduce.args[0]
        if not isinstance(linear, fx.Node) or reduce.kwargs or len(linear.users) != 1 or linear.kwargs:
            continue
        if is_kiln_op(linear, "act_and_mul_linear"):
            x, activation, weights, biases = linear.args[:4]
            w_scale = linear.args[4] if len(linear.args) > 4 else None
        elif any(is_kiln_op(linear, name) for name in ("linear", "merged_linear", "weight_only_linear")):
            (weights, biases, w_scale), x, activation = linear_args(linear), linear.args[0], ""
        else:
            continue
        with g.inserting_before(reduce):
            fused = g.call_function(torch.ops.kiln.linear_all_reduce.default,
                                    (x, activation, list(weights), list(biases), w_scale))
        fused.meta["example_value"] = reduce.meta.get("example_value")
        reduce.replace_all_uses_with(fused)
        g.erase_node(reduce)
        g.erase_node(linear)
    return graph.finish()
