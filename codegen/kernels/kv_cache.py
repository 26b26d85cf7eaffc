"""The paged KV-cache write (vLLM's reshape_and_cache): one program per token.

k [T, Hkv, D] and v [T, Hkv, Dv] (unit last stride; other layouts are copied) go into
k_cache [num_blocks, block_size, Hkv, D] / v_cache [num_blocks, block_size, Hkv, Dv] at
slot_mapping [T] int32/int64 (slot = block * block_size + offset), converted to the caches'
dtype. A negative slot marks a padding token (a CUDA-graph bucket's filler) and is skipped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    k_stride_t, k_stride_h, v_stride_t, v_stride_h,
    kc_stride_b, kc_stride_s, kc_stride_h, vc_stride_b, vc_stride_s, vc_stride_h,
    HKV, D, DV, block_size,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
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
                     kv.to(k_cache_ptr.dtype.element_ty), mask=kmask)
            vmask = (h[:, None] < HKV) & (dv[None, :] < DV)
            vv = tl.load(v_ptr + t * v_stride_t + h[:, None] * v_stride_h + dv[None, :], mask=vmask)
            tl.store(v_cache_ptr + blk * vc_stride_b + off * vc_stride_s + h[:, None] * vc_stride_h + dv[None, :],
                     vv.to(v_cache_ptr.dtype.element_ty), mask=vmask)


def write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """k [T, Hkv, D], v [T, Hkv, Dv] -> k_cache/v_cache [num_blocks, block_size, Hkv, D|Dv] at
    slot_mapping [T] (negative slots skipped), in place."""
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
        HKV, D, DV, k_cache.shape[1],
        BLOCK_H=min(triton.next_power_of_2(HKV), max(1, 4096 // block_d)),
        BLOCK_D=triton.next_power_of_2(D), BLOCK_DV=triton.next_power_of_2(DV), num_warps=4,
    )
