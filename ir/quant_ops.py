"""Quantized ops: the forms `linear` takes after the quantize pass. Models never call these.

Two schemes, each over int8 or fp8 (float8_e4m3fn) weights with one float32 scale per output
channel (`w ≈ wq * w_scale[:, None]`):

- weight-only (`weight_only_linear`): activations stay in the model dtype, the weight is
  dequantized inside the GEMM. Halves the bytes a memory-bound decode step reads.
- W8A8 (`scaled_linear`): activations are quantized too, per token with a dynamic scale
  (`quantize`), and the GEMM runs on 8-bit inputs (fp8 tensor cores, int8 IMMA), with both
  scales applied to the float accumulator.

The fused forms (`rms_norm_quant`, `add_rms_norm_quant`, `silu_and_mul_quant`) quantize the
output of the op before them in the same kernel; the fuse_quant pass produces them.

References run in float32 and are the ground truth on CPU, like every op of the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kiln.ir.ops import _rms_norm, kiln_op

QUANT_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
# `LLM(quantization=...)` -> (8-bit kind, whether activations are quantized too: W8A8)
SCHEMES = {"int8": ("int8", True), "fp8": ("fp8", True), "int8_weight_only": ("int8", False),
           "fp8_weight_only": ("fp8", False)}
QUANT_MAX = {"int8": 127.0, "fp8": 448.0}
_MIN_SCALE = 1e-10  # an all-zero row quantizes to zeros instead of dividing by zero


@dataclass
class WeightQuant:
    """An 8-bit weight: `data` [N, K] int8 or fp8, `scale` [N] float32 (w ≈ data * scale[:, None]),
    and whether the GEMM quantizes its activations too (W8A8) or only the weight. Attached as
    `param.kiln_quant` to a parameter holding 8-bit values (`data` is then the parameter itself):
    by the loader for a pre-quantized checkpoint, at load for `LLM(quantization=...)`
    (frontend/quantization.py); the quantize pass reads it."""

    kind: str  # "int8" | "fp8"
    scale: torch.Tensor
    activations: bool
    data: torch.Tensor | None = None


def _divide_by_qmax(amax: torch.Tensor, kind: str) -> torch.Tensor:
    # Divided by a device tensor, not a Python number: CUDA turns division by a host scalar into a
    # multiplication by its reciprocal, one ulp off the true quotient the kernels compute.
    return amax.clamp(min=_MIN_SCALE) / torch.tensor(QUANT_MAX[kind], device=amax.device)


def _check_kind(kind: str) -> None:
    if kind not in QUANT_DTYPES:
        raise ValueError(f"quantized dtype {kind!r} is not supported; use one of {', '.join(QUANT_DTYPES)}")


def quantize_values(x: torch.Tensor, scale: torch.Tensor, kind: str) -> torch.Tensor:
    """x / scale rounded into the 8-bit dtype (int8 rounds to nearest, fp8 saturates at ±448)."""
    q = x.float() / scale
    if kind == "int8":
        return q.round().clamp(-127, 127).to(torch.int8)
    return q.clamp(-448.0, 448.0).to(torch.float8_e4m3fn)


def quantize_weight(weight: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel quantization of a [N, K] weight -> (wq [N, K], scale [N] f32)."""
    _check_kind(kind)
    scale = _divide_by_qmax(weight.float().abs().amax(dim=1), kind)
    return quantize_values(weight, scale[:, None], kind), scale


def dequantize_weight(wq: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 [N, K] from (wq [N, K], scale [N])."""
    return wq.float() * scale.float()[:, None]


# ---------------------------------------------------------------- activation quantization


def _quantize_rows(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    _check_kind(kind)
    scale = _divide_by_qmax(x.float().abs().amax(dim=-1, keepdim=True), kind)
    return quantize_values(x, scale, kind), scale


@kiln_op("quantize")
def quantize(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token quantization: x [..., K] -> (xq [..., K] int8 or fp8, scale [..., 1] float32),
    x ≈ xq * scale, scale = max |row| / qmax (127 for int8, 448 for fp8)."""
    return _quantize_rows(x, kind)


def _fake_quantized(x: torch.Tensor, width, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    rows = x.shape[:-1]
    return x.new_empty((*rows, width), dtype=QUANT_DTYPES[kind]), x.new_empty((*rows, 1), dtype=torch.float32)


@quantize.register_fake
def _(x, kind):
    return _fake_quantized(x, x.shape[-1], kind)


@kiln_op("rms_norm_quant")
def rms_norm_quant(x: torch.Tensor, weight: torch.Tensor, eps: float, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize(rms_norm(x, weight, eps), kind) in one pass over x."""
    return _quantize_rows(_rms_norm(x, weight, eps), kind)


@rms_norm_quant.register_fake
def _(x, weight, eps, kind):
    return _fake_quantized(x, x.shape[-1], kind)


@kiln_op("add_rms_norm_quant")
def add_rms_norm_quant(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                       kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """add_rms_norm with its normalized output quantized: (xq, scale, x + residual)."""
    summed = x + residual
    xq, scale = _quantize_rows(_rms_norm(summed, weight, eps), kind)
    return xq, scale, summed


@add_rms_norm_quant.register_fake
def _(x, residual, weight, eps, kind):
    return (*_fake_quantized(x, x.shape[-1], kind), torch.empty_like(x))


@kiln_op("silu_and_mul_quant")
def silu_and_mul_quant(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize(silu_and_mul(x), kind): x [..., 2F] -> (xq [..., F], scale [..., 1])."""
    gate, up = x.chunk(2, dim=-1)
    return _quantize_rows(F.silu(gate) * up, kind)


@silu_and_mul_quant.register_fake
def _(x, kind):
    return _fake_quantized(x, x.shape[-1] // 2, kind)


# ---------------------------------------------------------------- quantized GEMMs


@kiln_op("scaled_linear")
def scaled_linear(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                  bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """W8A8 GEMM: xq [..., K] and wq [N, K] both int8 or both fp8, x_scale [..., 1] and w_scale [N]
    float32, bias [N] or None -> (xq @ wq.T) * x_scale * w_scale (+ bias), [..., N] in out_dtype."""
    acc = xq.float() @ wq.float().t()
    out = acc * x_scale * w_scale
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


@scaled_linear.register_fake
def _(xq, x_scale, wq, w_scale, bias, out_dtype):
    return xq.new_empty((*xq.shape[:-1], wq.shape[0]), dtype=out_dtype)


@kiln_op("weight_only_linear")
def weight_only_linear(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                       bias: torch.Tensor | None) -> torch.Tensor:
    """Weight-only GEMM: x [..., K] in the model dtype, wq [N, K] int8 or fp8, w_scale [N] float32,
    bias [N] or None -> F.linear(x, dequantized weight in x's dtype, bias), [..., N]."""
    return F.linear(x, dequantize_weight(wq, w_scale).to(x.dtype), bias)


@weight_only_linear.register_fake
def _(x, wq, w_scale, bias):
    return x.new_empty((*x.shape[:-1], wq.shape[0]))
