"""The verifier: a traced model may call kiln ops and plain tensor code, nothing else.

Plain tensor code is shape and indexing work and elementwise arithmetic (what `models/` may write
beside the ops). An op that does a model's real work outside the vocabulary — a matmul, a norm,
attention, an embedding lookup — is refused with its name and the model line that called it, so
every model stays visible to the passes and kernels.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from kiln.ir.graph import Graph, is_kiln_op

# What a model must express through kiln ops instead.
FORBIDDEN = {
    torch.nn.functional.linear: "linear", torch.matmul: "linear", torch.mm: "linear", torch.bmm: "linear",
    torch.nn.functional.embedding: "embedding", torch.nn.functional.layer_norm: "layer_norm",
    torch.nn.functional.rms_norm: "rms_norm", torch.nn.functional.scaled_dot_product_attention: "attention",
    torch.softmax: "attention / the poolers", torch.nn.functional.softmax: "attention / the poolers",
    torch.einsum: "linear / attention", torch.baddbmm: "linear", torch.addmm: "linear",
}
FORBIDDEN_METHODS = {"matmul": "linear", "mm": "linear", "bmm": "linear", "softmax": "attention / the poolers"}


class VocabularyError(ValueError):
    pass


def verify(graph: Graph) -> None:
    """Raise VocabularyError naming the first op outside the vocabulary and its model line."""
    for node in graph.graph.nodes:
        replacement = None
        if node.op == "call_function" and not is_kiln_op(node):
            replacement = FORBIDDEN.get(node.target)
            if isinstance(node.target, torch._ops.OpOverload) and node.target.namespace == "aten":
                name = node.target._schema.name.split("::")[-1]
                if name in ("mm", "bmm", "addmm", "linear", "matmul", "embedding", "layer_norm",
                            "scaled_dot_product_attention", "_softmax", "softmax"):
                    replacement = name
        elif node.op == "call_method":
            replacement = FORBIDDEN_METHODS.get(node.target)
        elif node.op == "call_module":
            replacement = "a kiln op"
        if node.op == "call_function" and node.target is operator.matmul:
            replacement = "linear"
        if replacement is not None:
            raise VocabularyError(
                f"{_name(node)} is outside kiln's op vocabulary: use ops.{replacement.split(' ')[0]} "
                f"(called at {_where(node)})")


def _name(node: fx.Node) -> str:
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def _where(node: fx.Node) -> str:
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip().startswith("File")]
    return lines[-1] if lines else "an unknown line"
