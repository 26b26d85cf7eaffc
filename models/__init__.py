"""Model families written with kiln's op vocabulary, and the architecture registry."""

from kiln.models.registry import resolve_architecture, supported_architectures

__all__ = ["resolve_architecture", "supported_architectures"]
