"""RMSNorm and residual-add + RMSNorm: one program per row.

Same semantics as `kiln.ir.ops.rms_norm` / `add_rms_norm`: the statistics in float32, the scale
in the input dtype (HF's order): `weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)`.

Shapes and dtypes: x and residual [..., E] float32/float16/bfloat16 with a unit last stride
(other layouts are copied), weight [E]; the output has the dtype torch's promotion of
(weight, x) gives, as the reference does. A row of up to 8192 elements stays in registers (one
read of x); longer rows are read twice.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.codegen.kernels.pdl import launch_args, wait_for_inputs

_MAX_SINGLE_BLOCK = 8192


@triton.jit
def _norm_input(x_row, res_row, sum_row, offs, mask, E, HAS_RESIDUAL: tl.constexpr, X_COPIES: tl.constexpr):
    """The RMSNorm input at `offs`: x, or x + residual rounded to the summed dtype before the
    statistics (as the reference does), which is also stored as the op's second output. X_COPIES
    > 0 (with a residual): x is that many float32 rows E apart whose sum, rounded to the residual's
    dtype, is the row (`fused_mlp`'s partial sums)."""
    x = tl.load(x_row + offs, mask=mask, other=0.0)
    if X_COPIES > 0:
        total = x.to(tl.float32)
        for c in tl.static_range(1, X_COPIES):
            total += tl.load(x_row + c * E + offs, mask=mask, other=0.0).to(tl.float32)
        x = total.to(res_row.dtype.element_ty)
    if HAS_RESIDUAL:
        r = tl.load(res_row + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(sum_row.dtype.element_ty)
        tl.store(sum_row + offs, x, mask=mask)
    return x


@triton.jit
def _chunked_rstd(x_row, res_row, sum_row, cols, E, eps,
                  HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, NUM_CHUNKS: tl.constexpr, X_COPIES: tl.constexpr):
    """rsqrt(mean(x^2) + eps) of a row read in NUM_CHUNKS chunks of BLOCK (storing x + residual)."""
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for c in range(NUM_CHUNKS):
        offs = c * BLOCK + cols
        xf = _norm_input(x_row, res_row, sum_row, offs, offs < E, E, HAS_RESIDUAL, X_COPIES).to(tl.float32)
        acc += xf * xf
    return tl.rsqrt(tl.sum(acc, axis=0) / E + eps)


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr,
    x_stride, res_stride, E, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, NUM_CHUNKS: tl.constexpr, X_COPIES: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    res_row = res_ptr + row * res_stride
    out_row = out_ptr + row * E
    sum_row = sum_ptr + row * E
    cols = tl.arange(0, BLOCK)
    if NUM_CHUNKS == 1:
        mask = cols < E
        x = _norm_input(x_row, res_row, sum_row, cols, mask, E, HAS_RESIDUAL, X_COPIES)
        xf = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / E + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        y = (xf * rstd).to(x.dtype)
        tl.store(out_row + cols, (w.to(tl.float32) * y.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        rstd = _chunked_rstd(x_row, res_row, sum_row, cols, E, eps, HAS_RESIDUAL, BLOCK, NUM_CHUNKS, X_COPIES)
        for c in range(NUM_CHUNKS):
            offs = c * BLOCK + cols
            mask = offs < E
            if HAS_RESIDUAL:
                x = tl.load(sum_row + offs, mask=mask, other=0.0)
            else:
                x = tl.load(x_row + offs, mask=mask, other=0.0)
            w = tl.load(w_ptr + offs, mask=mask, other=0.0)
            y = (x.to(tl.float32) * rstd).to(x.dtype)
            tl.store(out_row + offs, (w.to(tl.float32) * y.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as a 2-D [rows, E] view with a unit last stride (a copy only when no such view exists)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _launch(x, residual, weight, eps, summed, partials=None):
    E = x.shape[-1]
    x2 = _rows(x) if partials is None else partials
    res2 = _rows(residual) if residual is not None else x2
    src_dtype = summed.dtype if summed is not None else x.dtype
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, src_dtype), device=x.device)
    rows = res2.shape[0] if partials is not None else x2.shape[0]
    if rows == 0 or E == 0:
        return out
    block = min(triton.next_power_of_2(E), _MAX_SINGLE_BLOCK)
    num_warps = 4 if block <= 1024 else 8 if block <= 4096 else 16
    _rms_norm_kernel[(rows,)](
        x2, res2, weight.contiguous(), out, summed if summed is not None else out,
        x2.stride(0), res2.stride(0), E, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=block, NUM_CHUNKS=triton.cdiv(E, block),
        X_COPIES=0 if partials is None else partials.shape[0], num_warps=num_warps,
        **launch_args(x.device),
    )
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., E], weight [E] -> [..., E]: weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)."""
    return _launch(x, None, weight, eps, None)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
    partials: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [..., E], weight [E] -> (rms_norm(x + residual), x + residual), both [..., E].
    partials (one row: x.numel() == E, which is then not read): [C, E] contiguous float32 rows whose
    sum rounded to the residual's dtype is x (`fused_mlp.mlp_gemv`'s output)."""
    if partials is not None and (x.numel() != x.shape[-1] or partials.dtype != torch.float32 or partials.dim() != 2
                                 or partials.shape[1] != x.shape[-1] or not partials.is_contiguous()):
        raise ValueError(f"add_rms_norm: partial sums stand for one row of {x.shape[-1]} as contiguous float32 rows; "
                         f"got x {tuple(x.shape)} and partials {partials.dtype} {tuple(partials.shape)}")
    summed = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device)
    return _launch(x, residual, weight, eps, summed, partials), summed
