"""Rotary position embedding, alone and fused with the KV-cache write; one program per token.

`rotary` has the semantics of `kiln.ir.ops.rotary`: q [T, H, D], k [T, Hkv, D] (float32/float16/
bfloat16, unit last stride; other layouts are copied), positions [T] int32/int64,
cos_sin_cache [max_positions, rotary_dim] float32 holding (cos | sin) of each position ->
(rotated q, rotated k), new tensors of q's and k's shapes. Only the first rotary_dim dims of each
head rotate (partial rotary); neox rotates the two halves, gpt-j interleaved pairs. cos and sin are
rounded to q's dtype first, as the reference does; the rotation itself runs in float32.

`rotary_kv_cache` also writes the rotated k and v [T, Hkv, Dv] into the paged caches
k_cache [num_blocks, block_size, Hkv, D] / v_cache [num_blocks, block_size, Hkv, Dv] at
slot_mapping [T] int (block * block_size + offset; a negative slot, a padding token, is skipped):
the work the `attention` op's cache write would do, done while k is still in registers. An fp8
cache gets k / k_scale and v / v_scale (see `kv_cache.to_cache`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.codegen.kernels.kv_cache import fp8_flags, to_cache
from kiln.codegen.kernels.pdl import launch_args, wait_for_inputs


@triton.jit
def _rotate_heads(
    src_ptr, src_stride_h, dst_ptr, dst_stride_h, cache_ptr, cache_stride_h,
    num_heads, cos, sin, D, cache_scale,
    HALF: tl.constexpr, IS_NEOX: tl.constexpr, WRITE_CACHE: tl.constexpr, FP8: tl.constexpr,
    EXACT_ROUND: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
):
    """Rotate num_heads heads of one token (src -> dst; and into cache when WRITE_CACHE, divided
    by cache_scale when it is fp8)."""
    i = tl.arange(0, BLOCK_HALF)
    if IS_NEOX:
        d1, d2 = i, i + HALF
    else:
        d1, d2 = 2 * i, 2 * i + 1
    for h0 in range(0, num_heads, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        mask = (h[:, None] < num_heads) & (i[None, :] < HALF)
        src = src_ptr + h[:, None] * src_stride_h
        x1 = tl.load(src + d1[None, :], mask=mask, other=0.0)
        x2 = tl.load(src + d2[None, :], mask=mask, other=0.0)
        x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
        o1 = (x1f * cos[None, :] - x2f * sin[None, :]).to(dst_ptr.dtype.element_ty)
        o2 = (x2f * cos[None, :] + x1f * sin[None, :]).to(dst_ptr.dtype.element_ty)
        dst = dst_ptr + h[:, None] * dst_stride_h
        tl.store(dst + d1[None, :], o1, mask=mask)
        tl.store(dst + d2[None, :], o2, mask=mask)
        if WRITE_CACHE:
            cache = cache_ptr + h[:, None] * cache_stride_h
            tl.store(cache + d1[None, :], to_cache(o1, cache_ptr, cache_scale, FP8, EXACT_ROUND), mask=mask)
            tl.store(cache + d2[None, :], to_cache(o2, cache_ptr, cache_scale, FP8, EXACT_ROUND), mask=mask)
        if BLOCK_PASS > 0:  # partial rotary: the dims past rotary_dim pass through
            p = 2 * HALF + tl.arange(0, BLOCK_PASS)
            pmask = (h[:, None] < num_heads) & (p[None, :] < D)
            xp = tl.load(src + p[None, :], mask=pmask, other=0.0)
            tl.store(dst + p[None, :], xp.to(dst_ptr.dtype.element_ty), mask=pmask)
            if WRITE_CACHE:
                tl.store(cache + p[None, :], to_cache(xp, cache_ptr, cache_scale, FP8, EXACT_ROUND), mask=pmask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, cs_ptr, q_out_ptr, k_out_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    q_stride_t, q_stride_h, k_stride_t, k_stride_h, v_stride_t, v_stride_h, qo_stride_t, ko_stride_t, cs_stride,
    kc_stride_b, kc_stride_s, kc_stride_h, vc_stride_b, vc_stride_s, vc_stride_h,
    H, HKV, D, DV, block_size, k_scale, v_scale,
    HALF: tl.constexpr, IS_NEOX: tl.constexpr, WRITE_CACHE: tl.constexpr, FP8: tl.constexpr,
    EXACT_ROUND: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr, BLOCK_DV: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_inputs(PDL)
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    i = tl.arange(0, BLOCK_HALF)
    cmask = i < HALF
    # The reference rounds cos/sin to the activations' dtype before rotating.
    cos = tl.load(cs_ptr + pos * cs_stride + i, mask=cmask, other=0.0).to(q_ptr.dtype.element_ty).to(tl.float32)
    sin = tl.load(cs_ptr + pos * cs_stride + HALF + i, mask=cmask, other=0.0).to(q_ptr.dtype.element_ty).to(tl.float32)
    _rotate_heads(q_ptr + t * q_stride_t, q_stride_h, q_out_ptr + t * qo_stride_t, D, q_out_ptr, 0,
                  H, cos, sin, D, 1.0, HALF, IS_NEOX, False, False, False, BLOCK_H, BLOCK_HALF, BLOCK_PASS)
    if WRITE_CACHE:
        slot = tl.load(slot_ptr + t).to(tl.int64)
        # A negative slot marks a padding token: rotate it but store nothing in the cache.
        valid = slot >= 0
        slot = tl.where(valid, slot, 0)
        kc = k_cache_ptr + (slot // block_size) * kc_stride_b + (slot % block_size) * kc_stride_s
        if valid:
            _rotate_heads(k_ptr + t * k_stride_t, k_stride_h, k_out_ptr + t * ko_stride_t, D, kc, kc_stride_h,
                          HKV, cos, sin, D, k_scale, HALF, IS_NEOX, True, FP8, EXACT_ROUND, BLOCK_H, BLOCK_HALF,
                          BLOCK_PASS)
            vc = v_cache_ptr + (slot // block_size) * vc_stride_b + (slot % block_size) * vc_stride_s
            dv = tl.arange(0, BLOCK_DV)
            for h0 in range(0, HKV, BLOCK_H):
                h = h0 + tl.arange(0, BLOCK_H)
                vmask = (h[:, None] < HKV) & (dv[None, :] < DV)
                vals = tl.load(v_ptr + t * v_stride_t + h[:, None] * v_stride_h + dv[None, :], mask=vmask, other=0.0)
                tl.store(vc + h[:, None] * vc_stride_h + dv[None, :],
                         to_cache(vals, v_cache_ptr, v_scale, FP8, EXACT_ROUND), mask=vmask)
        else:
            _rotate_heads(k_ptr + t * k_stride_t, k_stride_h, k_out_ptr + t * ko_stride_t, D, k_out_ptr, 0,
                          HKV, cos, sin, D, 1.0, HALF, IS_NEOX, False, False, False, BLOCK_H, BLOCK_HALF, BLOCK_PASS)
    else:
        _rotate_heads(k_ptr + t * k_stride_t, k_stride_h, k_out_ptr + t * ko_stride_t, D, k_out_ptr, 0,
                      HKV, cos, sin, D, 1.0, HALF, IS_NEOX, False, False, False, BLOCK_H, BLOCK_HALF, BLOCK_PASS)


def _heads(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _launch(q, k, positions, cos_sin_cache, is_neox, v=None, k_cache=None, v_cache=None, slot_mapping=None,
            k_scale=1.0, v_scale=1.0, in_place=False):
    T, H, D = q.shape
    HKV = k.shape[1]
    rot = cos_sin_cache.shape[-1]
    half = rot // 2
    if in_place:  # (each element is read before it is written, by the same program)
        if q.stride(-1) != 1 or k.stride(-1) != 1 or q.stride(1) != D or k.stride(1) != D:
            raise ValueError("rotary in place needs heads laid out [..., head, dim] with unit last stride")
        q_out, k_out = q, k
    else:
        q, k = _heads(q), _heads(k)
        q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if T == 0:
        return q_out, k_out
    cs = cos_sin_cache if cos_sin_cache.stride(-1) == 1 else cos_sin_cache.contiguous()
    write = k_cache is not None
    flags = fp8_flags(k_cache) if write else {"FP8": False, "EXACT_ROUND": False}
    if write:
        v = _heads(v)
        dv = v.shape[-1]
        kc_s, vc_s = k_cache.stride(), v_cache.stride()
        block_size = k_cache.shape[1]
    else:
        v, k_cache, v_cache, slot_mapping = k, k_out, k_out, positions
        dv, kc_s, vc_s, block_size = D, (0, 0, 0, 0), (0, 0, 0, 0), 1
    block_h = min(triton.next_power_of_2(max(H, HKV)), max(1, 4096 // triton.next_power_of_2(D)))
    _rotary_kernel[(T,)](
        q, k, v, positions, cs, q_out, k_out, k_cache, v_cache, slot_mapping,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), q_out.stride(0), k_out.stride(0),
        cs.stride(0),
        kc_s[0], kc_s[1], kc_s[2], vc_s[0], vc_s[1], vc_s[2],
        H, HKV, D, dv, block_size, float(k_scale), float(v_scale),
        HALF=half, IS_NEOX=is_neox, WRITE_CACHE=write, **flags, BLOCK_H=block_h,
        BLOCK_HALF=triton.next_power_of_2(max(half, 1)),
        BLOCK_PASS=triton.next_power_of_2(D - rot) if D > rot else 0,
        BLOCK_DV=triton.next_power_of_2(dv), num_warps=4, **launch_args(q.device),
    )
    return q_out, k_out


def rotary(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, is_neox: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, H, D], k [T, Hkv, D], positions [T], cos_sin_cache [max_positions, rotary_dim] float32
    -> (rotated q [T, H, D], rotated k [T, Hkv, D])."""
    return _launch(q, k, positions, cos_sin_cache, is_neox)


def rotary_kv_cache(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
    is_neox: bool, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    k_scale: float = 1.0, v_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """rotary(q, k, ...) plus the cache write: rotated k and v [T, Hkv, Dv] go into k_cache/v_cache
    [num_blocks, block_size, Hkv, D|Dv] at slot_mapping [T] (negative slots skipped; an fp8 cache
    gets k / k_scale and v / v_scale). Returns (rotated q, rotated k); the caches are updated in place."""
    return _launch(q, k, positions, cos_sin_cache, is_neox, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def rotary_in_place(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                    is_neox: bool, v: torch.Tensor | None = None, k_cache: torch.Tensor | None = None,
                    v_cache: torch.Tensor | None = None, slot_mapping: torch.Tensor | None = None,
                    k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """rotary (with the cache write when the caches are given) rotating q and k where they are:
    views of one q/k/v projection's output, [T, heads, D] with any token stride (a fused
    projection's fallback for several rows, `triton_ops.rms_norm_linear_rope`)."""
    _launch(q, k, positions, cos_sin_cache, is_neox, v, k_cache, v_cache, slot_mapping, k_scale, v_scale, in_place=True)
