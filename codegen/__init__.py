"""Lowering kiln's IR to code: Inductor for the aten regions (kiln ops stay calls into their
device implementation: the reference on CPU, Triton kernels on CUDA), and the on-disk compile cache."""

from kiln.codegen.lower import compile_cache_dir, lower

__all__ = ["lower", "compile_cache_dir"]
