"""Sibling linears: several `linear`s reading the same input (q/k/v, gate/up) become one
`merged_linear` and a split. One matmul instead of three, same numbers.

`merged_linear` reads the weights as one matrix without a copy when they lie back to back in one
storage: the loader lays out the siblings a model names in `adjacent_weights` that way (a pass
cannot move parameters: the traced graph is guarded on their layout). Otherwise it concatenates
them on each call — correct, but a copy.
"""

from __future__ import annotations

import operator
from collections import defaultdict

import torch

from kiln.ir.graph import Graph

NAME = "merge_linears"


def run(graph: Graph) -> Graph:
    groups = defaultdict(list)
    for node in graph.calls("linear"):
        x, weight = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if graph.is_parameter(weight) and (bias is None or graph.is_parameter(bias)):
            groups[(x, bias is None)].append((node, weight, bias))
    for (x, _), members in groups.items():
        if len(members) < 2:
            continue
        weights = [graph.example_value(w) for _, w, _ in members]
        if len({(w.dtype, w.device, w.shape[1]) for w in weights}) != 1:
            continue
        biases = [b for _, _, b in members] if members[0][2] is not None else []
        sizes = [w.shape[0] for w in weights]
        first = members[0][0]
        with graph.graph.inserting_before(first):
            merged = graph.graph.call_function(torch.ops.kiln.merged_linear.default,
                                               (x, [w for _, w, _ in members], biases))
            parts = graph.graph.call_function(torch.split, (merged, sizes), {"dim": -1})
        for i, (node, _, _) in enumerate(members):
            with graph.graph.inserting_before(first):
                piece = graph.graph.call_function(operator.getitem, (parts, i))
            node.replace_all_uses_with(piece)
    return graph.finish()
