"""Triton kernels for kiln's hot ops, one module each: the kernel and a launcher with the op's
signature and semantics (see `kiln.ir.ops`). Importing this package needs triton."""

from kiln.codegen.kernels.activation import gelu_and_mul, silu_and_mul
from kiln.codegen.kernels.decode_attention import decode_attention
from kiln.codegen.kernels.kv_cache import write_kv_cache
from kiln.codegen.kernels.norm import add_rms_norm, rms_norm
from kiln.codegen.kernels.prefill_attention import prefill_attention
from kiln.codegen.kernels.quant import add_rms_norm_quant, quantize, rms_norm_quant, silu_and_mul_quant
from kiln.codegen.kernels.quant_gemm import GemmConfig, scaled_linear, weight_only_linear
from kiln.codegen.kernels.rotary import rotary, rotary_kv_cache

__all__ = ["rms_norm", "add_rms_norm", "silu_and_mul", "gelu_and_mul", "rotary", "rotary_kv_cache",
           "write_kv_cache", "decode_attention", "prefill_attention", "quantize", "rms_norm_quant",
           "add_rms_norm_quant", "silu_and_mul_quant", "GemmConfig", "scaled_linear", "weight_only_linear"]
