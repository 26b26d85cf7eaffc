"""No-ops: `cat` of a `split`'s pieces in order (what gate/up merging leaves before
silu_and_mul), casts to the dtype a tensor already has, and reshapes to the shape it already has."""

from __future__ import annotations

import operator

import torch

from kiln.ir.graph import Graph

NAME = "noop_elimination"
_SPLITS = (torch.split, torch.Tensor.split, torch.chunk, torch.Tensor.chunk)
_CASTS = ("to", "float", "half", "bfloat16", "type_as")
_RESHAPES = ("view", "reshape", "flatten", "unflatten", "contiguous")


def run(graph: Graph) -> Graph:
    for node in list(graph.graph.nodes):
        source = _cat_of_split(node) or _same_value(graph, node)
        if source is not None:
            node.replace_all_uses_with(source)
    return graph.finish()


def _cat_of_split(node):
    if node.op != "call_function" or node.target is not torch.cat:
        return None
    pieces = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if not pieces or not all(p.op == "call_function" and p.target is operator.getitem for p in pieces):
        return None
    split = pieces[0].args[0]
    if any(p.args[0] is not split for p in pieces) or [p.args[1] for p in pieces] != list(range(len(pieces))):
        return None
    if split.op not in ("call_function", "call_method") or split.target not in _SPLITS + ("split", "chunk"):
        return None
    split_dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    sizes = split.args[1] if len(split.args) > 1 else None
    n_outputs = len(split.meta["example_value"]) if "example_value" in split.meta else (
        len(sizes) if isinstance(sizes, (list, tuple)) else None)
    if n_outputs != len(pieces) or not _same_dim(split_dim, dim, split.args[0]):
        return None
    return split.args[0]


def _same_dim(a, b, source) -> bool:
    rank = source.meta["example_value"].dim() if "example_value" in source.meta else None
    if rank is None:
        return a == b
    return a % rank == b % rank


def _same_value(graph: Graph, node):
    """A cast or reshape whose output has the input's dtype and shape."""
    if node.op not in ("call_method", "call_function") or not node.args:
        return None
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    if name not in _CASTS + _RESHAPES:
        return None
    source = node.args[0]
    before, after = graph.example_value(source), node.meta.get("example_value")
    if not isinstance(before, torch.Tensor) or not isinstance(after, torch.Tensor):
        return None
    if before.dtype != after.dtype or before.shape != after.shape or before.device != after.device:
        return None
    if name in _RESHAPES and name != "contiguous" and before.stride() != after.stride():
        return None
    return source
