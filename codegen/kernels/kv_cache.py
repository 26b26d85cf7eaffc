"""The paged KV-cache write (vLLM's reshape_and_cache): one program per token.

k [T, Hkv, D] and v [T, Hkv, Dv] (unit last stride; other layouts are copied) go into
k_cache [num_blocks, block_size, Hkv, D] / v_cache [num_blocks, block_size, Hkv, Dv] at
slot_mapping [T] int32/int64 (slot = block * block_size + offset), converted to the caches'
dtype. A negative slot marks a padding token (a CUDA-graph bucket's filler) and is skipped.
An fp8 cache (float8_e4m3fn, kv_cache_dtype="fp8") stores k / k_scale and v / v_scale, computed
in float32 and clamped to +-448, as `kiln.ir.ops.quantize_kv`; `to_cache` is that conversion, shared
with the fused rotary + cache-write kernel.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kiln.codegen.kernels.pdl import launch_args, wait_for_inputs

FP8_KV_DTYPE = torch.float8_e4m3fn


def fp8_flags(cache: torch.Tensor) -> dict:
    """The constexpr flags of `to_cache` for a cache: FP8, and EXACT_ROUND under Triton's CPU
    interpreter, whose float32 -> fp8 conversion (triton 3.9) rounds half up, truncates subnormals
    and loses the carry into the exponent (0.124 -> 0.0625); the GPU rounds to nearest even."""
    fp8 = cache.dtype == FP8_KV_DTYPE
    return {"FP8": fp8, "EXACT_ROUND": fp8 and os.environ.get("TRITON_INTERPRET", "0") == "1"}


@triton.jit
def _round_to_e4m3(y):
    """float32 y, |y| <= 448 -> y rounded to nearest even on the float8_e4m3fn grid (still float32),
    so that the interpreter's conversion has nothing left to round."""
    a = tl.abs(y)
    bits = a.to(tl.int32, bitcast=True)
    # normal range: keep 3 mantissa bits (of 23), rounding to nearest even; a carry moves the exponent
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
    # subnormals (|y| < 2^-6) are multiples of 2^-9: round by adding 1.5 * 2^14, whose ulp is 2^-9
    r = tl.where(a < 0.015625, (a + 24576.0) - 24576.0, normal)
    return tl.where(y.to(tl.int32, bitcast=True) < 0, -r, r)


@triton.jit
def to_cache(x, cache_ptr, scale, FP8: tl.constexpr, EXACT_ROUND: tl.constexpr):
    """Values x -> cache_ptr's element type: as they are, or for an fp8 cache x / scale (float32),
    clamped to +-448 (the largest finite e4m3 value: saturate, never NaN)."""
    if FP8:
        y = tl.minimum(tl.maximum(x.to(tl.float32) / scale, -448.0), 448.0)
        if EXACT_ROUND:
            y = _round_to_e4m3(y)
        return y.to(cache_ptr.dtype.element_ty)
    return x.to(cache_ptr.dtype.element_ty)


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    k_stride_t, k_stride_h, v_stride_t, v_stride_h,
    kc_stride_b, kc_stride_s, kc_stride_h, vc_stride_b, vc_stride_s, vc_stride_h,
    HKV, D, DV, block_size, k_scale, v_scale,
    FP8: tl.constexpr, EXACT_ROUND: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_inputs(PDL)
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        blk, off = slot // block_size, slot % block_size
        d = tl.arange(0, BLOCK_D)
        dv = tl.arange(0, BLOCK_DV)
        for h0 in range(0, HKV, BLOCK_H):
            h = h0 + tl.arange(0, BLOCK_H)
            kmask = (h[:, None] < HKV) & (d[None, :] < D)
            kv = tl.load(k_ptr + t * k_stride_t + h[:, None] * k_stride_h + d[None, :], mask=kmask)
            tl.store(k_cache_ptr + blk * kc_stride_b + off * kc_stride_s + h[:, None] * kc_stride_h + d[None, :],
                     to_cache(kv, k_cache_ptr, k_scale, FP8, EXACT_ROUND), mask=kmask)
            vmask = (h[:, None] < HKV) & (dv[None, :] < DV)
            vv = tl.load(v_ptr + t * v_stride_t + h[:, None] * v_stride_h + dv[None, :], mask=vmask)
            tl.store(v_cache_ptr + blk * vc_stride_b + off * vc_stride_s + h[:, None] * vc_stride_h + dv[None, :],
                     to_cache(vv, v_cache_ptr, v_scale, FP8, EXACT_ROUND), mask=vmask)


def write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    k_scale: float = 1.0, v_scale: float = 1.0,
) -> None:
    """k [T, Hkv, D], v [T, Hkv, Dv] -> k_cache/v_cache [num_blocks, block_size, Hkv, D|Dv] at
    slot_mapping [T] (negative slots skipped), in place. k_scale / v_scale: an fp8 cache's scales
    (plain arguments, so one compiled kernel serves every layer); unused by other caches."""
    T, HKV, D = k.shape
    if T == 0:
        return
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    DV = v.shape[-1]
    kc, vc = k_cache.stride(), v_cache.stride()
    block_d = triton.next_power_of_2(max(D, DV))
    _write_kv_kernel[(T,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kc[0], kc[1], kc[2], vc[0], vc[1], vc[2],
        HKV, D, DV, k_cache.shape[1], float(k_scale), float(v_scale), **fp8_flags(k_cache),
        BLOCK_H=min(triton.next_power_of_2(HKV), max(1, 4096 // block_d)),
        BLOCK_D=triton.next_power_of_2(D), BLOCK_DV=triton.next_power_of_2(DV), num_warps=4,
        **launch_args(k.device),
    )
