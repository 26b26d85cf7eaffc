"""kiln's IR: the op vocabulary every model is written with, and the forward context the
runtime sets around a forward pass."""

from kiln.ir import ops  # noqa: F401  (registers the kiln:: custom ops)
from kiln.ir import quant_ops  # noqa: F401  (the quantized forms passes produce)
from kiln.ir.context import AttentionMetadata, ForwardContext, get_forward_context, set_forward_context

__all__ = ["ops", "AttentionMetadata", "ForwardContext", "get_forward_context", "set_forward_context"]
