"""Prefill attention over variable-length sequences (flash-attention style, online softmax).

q [T, H, D] holds the queries of B sequences flattened (unit last stride): sequence b owns rows
query_start_loc[b]:query_start_loc[b+1] (query_start_loc [B+1] int32, cumulative) and has
seq_lens[b] tokens of context after this step, the last query_len of which are its queries.
Keys and values come from the paged caches k_cache [num_blocks, block_size, Hkv, D] /
v_cache [num_blocks, block_size, Hkv, Dv] through block_tables [B, max_blocks]; or, with no
cache (an encoder step, whole sequences), from this step's k [T, Hkv, D] / v [T, Hkv, Dv] at the
same rows as the queries. -> out [T, H, Dv] in q's dtype. H is a multiple of Hkv (GQA).

Masks as `kiln.ir.ops.attention`: causal keeps keys with q_pos - k_pos >= 0 and, with a window W,
< W; bidirectional (causal=False) keeps all keys or, with a window, |q_pos - k_pos| <= W // 2.
`soft_cap` > 0 caps scores as cap * tanh(s / cap); `sinks` [H] float32 joins one logit per head
to the softmax with no value; `alibi_slopes` [H] float32 add slope * (k_pos - q_pos) (ALiBi). One program per (BLOCK_M queries, sequence, query head); the key
loop visits only the keys the mask can keep. Paged fp8 caches (float8_e4m3fn, holding k / k_scale
and v / v_scale) are read as in decode_attention: values converted to q's dtype, the scales
applied to the scores and the output rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.codegen.kernels.attention_common import (
    block_dim, check_cache, dot_precision, dot_upcast, load_paged, log2_scores, mma,
)


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, query_start_loc_ptr, seq_lens_ptr, sinks_ptr, alibi_ptr, out_ptr,
    q_stride_t, q_stride_h, k_stride_b, k_stride_s, k_stride_h, v_stride_b, v_stride_s, v_stride_h,
    table_stride, H, D, DV, GROUP, block_size, scale, soft_cap, sliding_window, v_scale,
    PAGED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFT_CAP: tl.constexpr,
    HAS_SINKS: tl.constexpr, HAS_ALIBI: tl.constexpr, KV_FP8: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    mb = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2)
    kvh = h // GROUP
    q_start = tl.load(query_start_loc_ptr + b).to(tl.int32)
    q_len = tl.load(query_start_loc_ptr + b + 1).to(tl.int32) - q_start
    # Programs past this sequence's queries (the grid is sized by the longest) do nothing.
    if mb * BLOCK_M < q_len:
        seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
        ctx = seq_len - q_len  # cached tokens before this step's queries
        m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = m < q_len
        q_pos = ctx + m
        d = tl.arange(0, BLOCK_D)
        d_mask = d < D
        dv = tl.arange(0, BLOCK_DV)
        dv_mask = dv < DV
        rows = (q_start + m).to(tl.int64)
        q = tl.load(q_ptr + rows[:, None] * q_stride_t + h * q_stride_h + d[None, :],
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        if not KV_FP8:  # (fp8 keys and values are converted to q's dtype instead)
            q = q.to(k_ptr.dtype.element_ty)

        # The key range any query of this tile can see.
        first = ctx + mb * BLOCK_M
        last = tl.minimum(first + BLOCK_M, seq_len) - 1
        lo = 0
        hi = seq_len
        if CAUSAL:
            hi = last + 1
            if HAS_WINDOW:
                lo = tl.maximum(first - sliding_window + 1, 0)
        elif HAS_WINDOW:
            lo = tl.maximum(first - sliding_window // 2, 0)
            hi = tl.minimum(last + sliding_window // 2 + 1, seq_len)
        if not PAGED:  # no cache: only this step's keys exist
            lo = tl.maximum(lo, ctx)
        table_row = tables_ptr + b * table_stride

        if HAS_ALIBI:  # (in the log2 units of the scores)
            slope = tl.load(alibi_ptr + h).to(tl.float32) * 1.4426950408889634
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
        for n0 in range(lo, hi, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_mask = n < hi
            if PAGED:
                k = load_paged(k_ptr, table_row, n, n_mask, kvh, k_stride_b, k_stride_s, k_stride_h, d, d_mask,
                               block_size)
                if KV_FP8:  # k_scale is folded into `scale` by the launcher
                    k = k.to(q.dtype)
            else:
                k_rows = (q_start + n - ctx).to(tl.int64)
                k = tl.load(k_ptr + k_rows[:, None] * k_stride_b + kvh * k_stride_h + d[None, :],
                            mask=n_mask[:, None] & d_mask[None, :], other=0.0)
            s = log2_scores(mma(q, tl.trans(k), PRECISION, UPCAST), scale, soft_cap, HAS_SOFT_CAP)
            diff = q_pos[:, None] - n[None, :]
            if HAS_ALIBI:  # slope * (k_pos - q_pos)
                s -= slope * diff.to(tl.float32)
            keep = n_mask[None, :]
            if CAUSAL:
                keep = keep & (diff >= 0)
                if HAS_WINDOW:
                    keep = keep & (diff < sliding_window)
            elif HAS_WINDOW:
                keep = keep & (tl.abs(diff) <= sliding_window // 2)
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            # A row with no key kept so far stays at -inf: subtract 0 instead to avoid inf - inf.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if PAGED:
                v = load_paged(v_ptr, table_row, n, n_mask, kvh, v_stride_b, v_stride_s, v_stride_h, dv, dv_mask,
                               block_size)
                if KV_FP8:
                    v = v.to(q.dtype)
            else:
                v = tl.load(v_ptr + k_rows[:, None] * v_stride_b + kvh * v_stride_h + dv[None, :],
                            mask=n_mask[:, None] & dv_mask[None, :], other=0.0)
            acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, PRECISION, UPCAST)
            m_i = m_new
        if KV_FP8:  # the weighted sum of v / v_scale, times v_scale
            acc = acc * v_scale

        if HAS_SINKS:
            sink = tl.load(sinks_ptr + h).to(tl.float32) * 1.4426950408889634
            m_f = tl.maximum(m_i, sink)
            w = tl.exp2(m_i - m_f)
            l_i = l_i * w + tl.exp2(sink - m_f)
            acc = acc * w[:, None]
        l_i = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_i[:, None]
        tl.store(out_ptr + rows[:, None] * (H * DV) + h * DV + dv[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & dv_mask[None, :])


def prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
    max_query_len: int, scale: float, block_tables: torch.Tensor | None = None, causal: bool = True,
    sliding_window: int = 0, soft_cap: float = 0.0, sinks: torch.Tensor | None = None,
    block_m: int | None = None, block_n: int | None = None, num_warps: int | None = None, num_stages: int = 2,
    k_scale: float = 1.0, v_scale: float = 1.0, alibi_slopes: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [T, H, D] -> [T, H, Dv] in q's dtype.

    With block_tables [B, max_blocks]: k, v are the paged caches [num_blocks, block_size, Hkv, D|Dv].
    Without: k [T, Hkv, D], v [T, Hkv, Dv] are this step's keys and values (seq_lens == query lens).
    query_start_loc [B+1] int32, seq_lens [B] int32; max_query_len (a host int) sizes the grid.
    block_m, block_n, num_warps and num_stages are tuning knobs that leave the result unchanged.
    k_scale / v_scale: paged fp8 caches' scales (unused by other caches and without a cache).
    alibi_slopes [H] float32: ALiBi, slope * (k_pos - q_pos) added to the scores.
    """
    T, H, D = q.shape
    paged = block_tables is not None
    if paged:
        check_cache("k_cache", k)
        check_cache("v_cache", v)
        HKV, DV = k.shape[2], v.shape[3]
        k_s, v_s = k.stride()[:3], v.stride()[:3]
        block_size = k.shape[1]
        tables = block_tables
    else:
        k = k if k.stride(-1) == 1 else k.contiguous()
        v = v if v.stride(-1) == 1 else v.contiguous()
        HKV, DV = k.shape[1], v.shape[2]
        k_s, v_s = (k.stride(0), 0, k.stride(1)), (v.stride(0), 0, v.stride(1))
        block_size, tables = 1, query_start_loc
    if H % HKV:
        raise ValueError(f"prefill_attention: {H} query heads is not a multiple of {HKV} kv heads")
    out = q.new_empty((T, H, DV))
    B = query_start_loc.shape[0] - 1
    if T == 0 or B == 0 or max_query_len == 0:
        return out
    q = q if q.stride(-1) == 1 else q.contiguous()
    block_d, block_dv = block_dim(D), block_dim(DV)
    big = max(block_d, block_dv) <= 128
    # (128, 64, 8 warps) measured best for long prompts at head dim 64 on an H200; 64-query tiles
    # were within 5% at 512-token prompts.
    block_m = block_m or (128 if big else 64)
    block_n = block_n or (64 if big else 32)
    num_warps = num_warps or (8 if block_m >= 128 else 4)
    grid = (triton.cdiv(max_query_len, block_m), B, H)
    fp8 = paged and k.dtype == torch.float8_e4m3fn
    compute = q.dtype if fp8 else k.dtype  # the dtype the dots multiply in
    _prefill_kernel[grid](
        q, k, v, tables, query_start_loc, seq_lens, sinks if sinks is not None else out,
        alibi_slopes.float().contiguous() if alibi_slopes is not None else out, out,
        q.stride(0), q.stride(1), k_s[0], k_s[1], k_s[2], v_s[0], v_s[1], v_s[2],
        tables.stride(0) if paged else 0, H, D, DV, H // HKV, block_size, scale * k_scale if fp8 else scale,
        soft_cap, sliding_window, float(v_scale),
        PAGED=paged, CAUSAL=causal, HAS_WINDOW=sliding_window > 0, HAS_SOFT_CAP=soft_cap > 0,
        HAS_SINKS=sinks is not None, HAS_ALIBI=alibi_slopes is not None, KV_FP8=fp8, PRECISION=dot_precision(compute), UPCAST=dot_upcast(compute),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv, num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
