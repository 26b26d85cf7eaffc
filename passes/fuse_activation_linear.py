"""A gated activation into the linear that reads it: `silu_and_mul` / `gelu_and_mul` whose output
only a `linear`, `merged_linear` or `weight_only_linear` reads becomes one `act_and_mul_linear`
with it (a Llama MLP's down projection).

Same numbers everywhere (the op's reference is the two ops in a row). What it buys is on the GPU:
a batch-1 step's gemv computes act(gate) * up from the gate/up projection's output as it streams
the down projection's weight (`kernels/quant_gemm.py`), so the activation is no launch of its own.
Runs after fuse_activation (which makes the gated ops it folds).
"""

from __future__ import annotations

import torch

from kiln.ir.graph import Graph, is_kiln_op
from kiln.passes.fuse_norm_linear import linear_args, linear_reading

NAME = "fuse_activation_linear"


def run(graph: Graph) -> Graph:
    g = graph.graph
    for act in [n for n in g.nodes if is_kiln_op(n, "silu_and_mul") or is_kiln_op(n, "gelu_and_mul")]:
        linear = linear_reading(act)
        if linear is None or act.kwargs:
            continue
        if is_kiln_op(act, "silu_and_mul"):
            activation = "silu"
        else:
            approximate = act.args[1] if len(act.args) > 1 else "none"
            activation = {"none": "gelu", "tanh": "gelu_tanh"}.get(approximate)
            if activation is None:
                continue
        weights, biases, w_scale = linear_args(linear)
        with g.inserting_before(linear):
            fused = g.call_function(torch.ops.kiln.act_and_mul_linear.default,
                                    (act.args[0], activation, weights, biases, w_scale))
        fused.meta["example_value"] = linear.meta.get("example_value")
        linear.replace_all_uses_with(fused)
    return graph.finish()
