"""Dynamic per-token quantization and the ops that fuse it: one program per row.

Same semantics as `kiln.ir.quant_ops.quantize` / `rms_norm_quant` / `add_rms_norm_quant` /
`silu_and_mul_quant`: the row's values are computed as the reference computes them (RMSNorm's
statistics in float32, the normalized value rounded to the input dtype before the weight, the
product rounded to the promoted dtype; SiLU rounded to x's dtype before the product), then
scale = max(max |row|, 1e-10) / qmax in float32 and q = v / scale, int8 rounded half to even and
clamped to ±127, fp8 (e4m3fn) clamped to ±448 and rounded to nearest even. Both divisions are
IEEE round-to-nearest (`div_rn`; Triton's plain `/` on float32 may be approximate on NVIDIA), so
`quantize` matches the reference bit for bit: amax is exact in any order, and every later step
is one correctly rounded operation. The fused forms round like the reference per element, but
their float32 sum of squares is added in another order, so a code can move by one where the
normalized value lands next to a rounding boundary.

Shapes and dtypes: x (and residual) [..., E] float32/float16/bfloat16 with a unit last stride
(other layouts are copied), weight [E]; outputs xq [..., E] int8 or float8_e4m3fn and scale
[..., 1] float32 (silu_and_mul_quant: x [..., 2F] -> xq [..., F]). A row of up to 8192 elements
stays in registers (one read); longer rows are read again per pass (from L2, in practice).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.codegen.kernels.norm import _chunked_rstd, _norm_input, _rows
from kiln.codegen.kernels.pdl import launch_args, wait_for_inputs
from kiln.ir.quant_ops import QUANT_DTYPES, _check_kind

_MAX_SINGLE_BLOCK = 8192
_MODE_QUANT, _MODE_RMS, _MODE_SILU = 0, 1, 2
TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _rint(q):
    """float32 -> the nearest integer, ties to even (torch.round), exact for |q| < 2^22: adding
    1.5 * 2^23 leaves no fraction bits, so IEEE round-to-nearest-even does the rounding."""
    return (q + 12582912.0) - 12582912.0


@triton.jit
def _round_to_e4m3(q):
    """float32 (|q| <= 448) -> the nearest float8_e4m3fn value, ties to even, still in float32, so
    the cast after it is exact. (The cast alone rounds the same on the GPU, but Triton's
    interpreter drops the carry when rounding up crosses a power of two: 125.9 -> 64.)"""
    bits = q.to(tl.int32, bitcast=True)
    # normal e4m3 (|q| >= 2^-6): keep 3 of the 23 mantissa bits, nearest even on the dropped 20;
    # a carry moves into the exponent as it should
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000).to(tl.float32, bitcast=True)
    # below 2^-6 the grid is the subnormal step 2^-9: 1.5 * 2^14 has that ulp; keep the sign of -0
    sub = tl.abs((q + 24576.0) - 24576.0)
    sub = tl.where(bits < 0, -sub, sub)
    return tl.where(tl.abs(q) < 0.015625, sub, normal)


@triton.jit
def _row_scale(amax, QMAX: tl.constexpr):
    """max |row| (float32) -> the row's scale, as the reference: clamp at 1e-10, then / qmax."""
    return tl.math.div_rn(tl.maximum(amax, 1e-10), QMAX)


@triton.jit
def _store_quantized(q_row, offs, mask, v, scale, IS_INT8: tl.constexpr):
    q = tl.math.div_rn(v, scale)
    if IS_INT8:
        tl.store(q_row + offs, tl.minimum(tl.maximum(_rint(q), -127.0), 127.0).to(tl.int8), mask=mask)
    else:
        q = _round_to_e4m3(tl.minimum(tl.maximum(q, -448.0), 448.0))
        tl.store(q_row + offs, q.to(tl.float8e4nv), mask=mask)


@triton.jit
def _row_values(x_row, w_ptr, src_row, offs, mask, E, rstd,
                MODE: tl.constexpr, Y_DTYPE: tl.constexpr):
    """The values to quantize at `offs` (float32, rounded as the reference rounds them; 0 where
    masked). src_row: the RMSNorm input (x, or x + residual once stored); rstd: its statistic."""
    if MODE == 0:
        v = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
    elif MODE == 1:
        x = tl.load(src_row + offs, mask=mask, other=0.0)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)
        y = (x.to(tl.float32) * rstd).to(x.dtype)
        v = (w.to(tl.float32) * y.to(tl.float32)).to(Y_DTYPE).to(tl.float32)
    else:
        gate = tl.load(x_row + offs, mask=mask, other=0.0)
        up = tl.load(x_row + E + offs, mask=mask, other=0.0)
        g = gate.to(tl.float32)
        a = (g * tl.sigmoid(g)).to(gate.dtype)
        v = (a.to(tl.float32) * up.to(tl.float32)).to(gate.dtype).to(tl.float32)
    return v


@triton.jit
def _row_quant_kernel(
    x_ptr, res_ptr, w_ptr, sum_ptr, q_ptr, scale_ptr,
    x_stride, res_stride, E, eps,
    MODE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, IS_INT8: tl.constexpr, QMAX: tl.constexpr,
    Y_DTYPE: tl.constexpr, BLOCK: tl.constexpr, NUM_CHUNKS: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    res_row = res_ptr + row * res_stride
    sum_row = sum_ptr + row * E
    q_row = q_ptr + row * E
    cols = tl.arange(0, BLOCK)
    if NUM_CHUNKS == 1:  # the row stays in registers: one read
        mask = cols < E
        if MODE == 1:
            x = _norm_input(x_row, res_row, sum_row, cols, mask, E, HAS_RESIDUAL, 0)
            xf = x.to(tl.float32)
            rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / E + eps)
            w = tl.load(w_ptr + cols, mask=mask, other=0.0)
            y = (xf * rstd).to(x.dtype)
            v = (w.to(tl.float32) * y.to(tl.float32)).to(Y_DTYPE).to(tl.float32)
        else:
            v = _row_values(x_row, w_ptr, x_row, cols, mask, E, 0.0, MODE, Y_DTYPE)
        scale = _row_scale(tl.max(tl.abs(v), axis=0), QMAX)
        _store_quantized(q_row, cols, mask, v, scale, IS_INT8)
    else:  # one pass for the statistics, one for max |v|, one to quantize
        rstd = 0.0
        src_row = x_row
        if MODE == 1:
            if HAS_RESIDUAL:
                src_row = sum_row  # the later passes read x + residual back (same offsets, same threads)
            rstd = _chunked_rstd(x_row, res_row, sum_row, cols, E, eps, HAS_RESIDUAL, BLOCK, NUM_CHUNKS, 0)
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for c in range(NUM_CHUNKS):
            offs = c * BLOCK + cols
            v = _row_values(x_row, w_ptr, src_row, offs, offs < E, E, rstd, MODE, Y_DTYPE)
            amax = tl.maximum(amax, tl.abs(v))
        scale = _row_scale(tl.max(amax, axis=0), QMAX)
        for c in range(NUM_CHUNKS):
            offs = c * BLOCK + cols
            mask = offs < E
            v = _row_values(x_row, w_ptr, src_row, offs, mask, E, rstd, MODE, Y_DTYPE)
            _store_quantized(q_row, offs, mask, v, scale, IS_INT8)
    tl.store(scale_ptr + row, scale)




def _launch(mode: int, x: torch.Tensor, kind: str, width: int, residual=None, weight=None, eps=0.0,
            summed=None, y_dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    _check_kind(kind)
    lead = x.shape[:-1]
    q = torch.empty((*lead, width), dtype=QUANT_DTYPES[kind], device=x.device)
    scale = torch.empty((*lead, 1), dtype=torch.float32, device=x.device)
    x2 = _rows(x)
    rows = x2.shape[0]
    if rows == 0:
        return q, scale
    res2 = _rows(residual) if residual is not None else x2
    block = min(triton.next_power_of_2(width), _MAX_SINGLE_BLOCK)
    num_warps = 4 if block <= 1024 else 8 if block <= 4096 else 16
    _row_quant_kernel[(rows,)](
        x2, res2, weight if weight is not None else x2, summed if summed is not None else q, q, scale,
        x2.stride(0), res2.stride(0), width, eps,
        MODE=mode, HAS_RESIDUAL=residual is not None, IS_INT8=kind == "int8",
        QMAX=127.0 if kind == "int8" else 448.0, Y_DTYPE=TL_DTYPES[y_dtype or x.dtype],
        BLOCK=block, NUM_CHUNKS=triton.cdiv(width, block), num_warps=num_warps, **launch_args(x.device),
    )
    return q, scale


def quantize(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (xq [..., K] int8 or fp8, scale [..., 1] float32), x ≈ xq * scale."""
    return _launch(_MODE_QUANT, x, kind, x.shape[-1])


def rms_norm_quant(x: torch.Tensor, weight: torch.Tensor, eps: float, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., E], weight [E] -> quantize(rms_norm(x, weight, eps), kind)."""
    return _launch(_MODE_RMS, x, kind, x.shape[-1], weight=weight.contiguous(), eps=eps,
                   y_dtype=torch.promote_types(weight.dtype, x.dtype))


def add_rms_norm_quant(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                       kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, residual [..., E], weight [E] -> (xq, scale) of rms_norm(x + residual), and x + residual."""
    sum_dtype = torch.promote_types(x.dtype, residual.dtype)
    summed = torch.empty(x.shape, dtype=sum_dtype, device=x.device)
    q, scale = _launch(_MODE_RMS, x, kind, x.shape[-1], residual=residual, weight=weight.contiguous(), eps=eps,
                       summed=summed, y_dtype=torch.promote_types(weight.dtype, sum_dtype))
    return q, scale, summed


def silu_and_mul_quant(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., 2F] holding (gate, up) -> quantize(silu(gate) * up, kind): (xq [..., F], scale [..., 1])."""
    return _launch(_MODE_SILU, x, kind, x.shape[-1] // 2)
