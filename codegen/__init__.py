"""Lowering kiln's IR to code: Inductor for the aten regions (kiln ops stay calls into their
device implementation: the reference on CPU, Triton kernels on CUDA; those that are plain aten
code everywhere, ATEN_OPS, are handed to Inductor as that code), and the on-disk compile cache."""

from kiln.codegen.lower import ATEN_OPS, compile_cache_dir, lower

__all__ = ["ATEN_OPS", "lower", "compile_cache_dir"]
