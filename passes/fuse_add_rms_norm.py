"""Residual add + RMSNorm: `s = x + r; y = rms_norm(s)` becomes one `add_rms_norm(x, r)` giving
(y, s), so the sum is written once and read once."""

from __future__ import annotations

import operator

import torch

from kiln.ir.graph import Graph

NAME = "fuse_add_rms_norm"


def run(graph: Graph) -> Graph:
    order = {n: i for i, n in enumerate(graph.graph.nodes)}
    for norm in list(graph.calls("rms_norm")):
        added = norm.args[0]
        if added.op != "call_function" or added.target not in (operator.add, torch.add) or len(added.args) != 2:
            continue
        x, residual = added.args
        if not all(isinstance(t, torch.fx.Node) for t in (x, residual)):
            continue
        vx, vr = x.meta.get("example_value"), residual.meta.get("example_value")
        if not isinstance(vx, torch.Tensor) or not isinstance(vr, torch.Tensor) or vx.shape != vr.shape:
            continue
        # the fused op replaces the add in place, so the norm's other inputs must exist by then
        if any(isinstance(a, torch.fx.Node) and order[a] > order[added] for a in norm.args[1:]):
            continue
        with graph.graph.inserting_after(added):
            fused = graph.graph.call_function(torch.ops.kiln.add_rms_norm.default, (x, residual, *norm.args[1:]))
        with graph.graph.inserting_after(fused):
            summed = graph.graph.call_function(operator.getitem, (fused, 1))
            normed = graph.graph.call_function(operator.getitem, (fused, 0))
        normed.meta["example_value"] = norm.meta.get("example_value")
        summed.meta["example_value"] = added.meta.get("example_value")
        norm.replace_all_uses_with(normed)
        added.replace_all_uses_with(summed)
    return graph.finish()
