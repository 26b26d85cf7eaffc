"""Model resolution, configuration and weight loading (tracing arrives with the compiler)."""

from kiln.frontend.config import load_hf_config, resolve_dtype, resolve_model_path
from kiln.frontend.loader import load_model

__all__ = ["load_hf_config", "resolve_dtype", "resolve_model_path", "load_model"]
