"""Paged decode attention (flash-decoding): one query per sequence over its paged KV cache.

q [B, H, D] (unit last stride), k_cache [num_blocks, block_size, Hkv, D], v_cache
[num_blocks, block_size, Hkv, Dv], block_tables [B, max_blocks] int32/int64, seq_lens [B] int32/
int64 (context length including this step's token, whose position is seq_len - 1) -> out
[B, H, Dv] in q's dtype. H is a multiple of Hkv (grouped-query attention): one program loads a
kv head's keys once for all its query heads. Every length lives in device tensors, so a launch
can be captured in a CUDA graph; the grid depends on B and the shapes only.

Each (sequence, kv head) splits its keys into `num_splits` chunks, one program each; with more
than one, the partial softmaxes are merged (log-sum-exp) into the output by the last of the
(sequence, kv head)'s programs to finish, which an atomic count per (sequence, kv head) tells
(one launch: on an H100, batch-1 decode of the Llama-3.2-1B shape 1.072 ms/token against 1.151
with a second, merging kernel, which stays for `merge_in_kernel=False`).
`sliding_window` W > 0 keeps the keys with q_pos - k_pos < W; `soft_cap` > 0 caps scores as
cap * tanh(s / cap); `sinks` [H] float32 adds one logit per head to the softmax with no value;
`alibi_slopes` [H] float32 add slope * (k_pos - q_pos) to each head's scores (ALiBi).
Statistics and accumulation in float32. An fp8 cache (float8_e4m3fn) holds k / k_scale and
v / v_scale: its values are converted to q's dtype (exactly: e4m3 fits in bf16 and fp16) and the
scales applied once per score and once per output row, not per element.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from kiln.codegen.kernels.attention_common import (
    block_dim, check_cache, dot_precision, dot_upcast, load_paged, load_paged_row, log2_scores, mma,
)
from kiln.codegen.kernels.pdl import launch_args, wait_for_inputs


@triton.jit
def _attend_tile(q, k, v, n, n_mask, seq_len, m_i, l_i, acc, scale, soft_cap, slopes,
                 HAS_SOFT_CAP: tl.constexpr, HAS_ALIBI: tl.constexpr, KV_FP8: tl.constexpr,
                 PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One tile of keys at positions n (those of n_mask, at least one) folded into the running
    softmax (m_i, l_i) and weighted sum acc of the query heads q."""
    if KV_FP8:  # k_scale is folded into `scale` by the launcher
        k = k.to(q.dtype)
    s = log2_scores(mma(q, tl.trans(k), PRECISION, UPCAST), scale, soft_cap, HAS_SOFT_CAP)
    if HAS_ALIBI:  # slope * (k_pos - q_pos); the query sits at seq_len - 1
        s += slopes[:, None] * (n - (seq_len - 1)).to(tl.float32)[None, :]
    s = tl.where(n_mask[None, :], s, float("-inf"))
    # Every tile holds at least one key, so m_new is finite.
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if KV_FP8:
        v = v.to(q.dtype)
    acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, PRECISION, UPCAST)
    return m_new, l_i, acc


@triton.jit
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, tables_ptr, seq_lens_ptr, sinks_ptr, alibi_ptr, out_ptr, part_acc_ptr,
    part_ml_ptr, q_stride_b, q_stride_h, kc_stride_b, kc_stride_s, kc_stride_h, vc_stride_b, vc_stride_s, vc_stride_h,
    table_stride, H, D, DV, GROUP, block_size, scale, soft_cap, sliding_window, v_scale, counter_ptr,
    NUM_SPLITS: tl.constexpr, MERGE_HERE: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFT_CAP: tl.constexpr,
    HAS_SINKS: tl.constexpr, HAS_ALIBI: tl.constexpr, KV_FP8: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, EARLY_KV: tl.constexpr, NEWEST_ROW: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PDL: tl.constexpr,
):
    if not EARLY_KV:
        wait_for_inputs(PDL)
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(seq_len - sliding_window, 0)
    # This split's share of [lo, seq_len), in whole BLOCK_N tiles.
    chunk = tl.cdiv(tl.cdiv(seq_len - lo, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = lo + split * chunk
    end = tl.minimum(start + chunk, seq_len)
    table_row = tables_ptr + b * table_stride
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    dv = tl.arange(0, BLOCK_DV)
    dv_mask = dv < DV
    first = start
    if EARLY_KV:
        # Before the wait, the split's first tile of keys and values but the newest: earlier steps
        # wrote them, and only this step's token (at seq_len - 1) can be in flight from the kernel
        # before (see `decode_attention`). Their loads overlap that kernel's end.
        n = start + tl.arange(0, BLOCK_N)
        early = n < tl.minimum(end, seq_len - 1)
        k_early = load_paged(k_cache_ptr, table_row, n, early, kvh, kc_stride_b, kc_stride_s, kc_stride_h, d, d_mask,
                             block_size)
        v_early = load_paged(v_cache_ptr, table_row, n, early, kvh, vc_stride_b, vc_stride_s, vc_stride_h, dv,
                             dv_mask, block_size)
        wait_for_inputs(PDL)
        first = start + BLOCK_N

    g = tl.arange(0, BLOCK_G)
    g_mask = g < GROUP
    heads = kvh * GROUP + g
    q = tl.load(q_ptr + b * q_stride_b + heads[:, None] * q_stride_h + d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    if not KV_FP8:  # (fp8 keys and values are converted to q's dtype instead)
        q = q.to(k_cache_ptr.dtype.element_ty)

    slopes = 0.0
    if HAS_ALIBI:  # (in the log2 units of the scores)
        slopes = tl.load(alibi_ptr + heads, mask=g_mask, other=0.0).to(tl.float32) * 1.4426950408889634
    m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_DV), tl.float32)
    if EARLY_KV:
        if start < end:  # the first tile, its newest row (if there) loaded now
            n = start + tl.arange(0, BLOCK_N)
            n_mask = n < end
            last = seq_len - 1
            if NEWEST_ROW:  # one row (see NEWEST_ROW)
                newest = (n == last)[:, None]
                k_row = load_paged_row(k_cache_ptr, table_row, last, start, end, kvh, kc_stride_b, kc_stride_s,
                                       kc_stride_h, d, d_mask, block_size)
                k = tl.where(newest, k_row[None, :], k_early)
                v_row = load_paged_row(v_cache_ptr, table_row, last, start, end, kvh, vc_stride_b, vc_stride_s,
                                       vc_stride_h, dv, dv_mask, block_size)
                v = tl.where(newest, v_row[None, :], v_early)
            else:  # a tile masked to the row
                newest = n_mask & (n == last)
                k = tl.where(newest[:, None], load_paged(k_cache_ptr, table_row, n, newest, kvh, kc_stride_b,
                                                         kc_stride_s, kc_stride_h, d, d_mask, block_size), k_early)
                v = tl.where(newest[:, None], load_paged(v_cache_ptr, table_row, n, newest, kvh, vc_stride_b,
                                                         vc_stride_s, vc_stride_h, dv, dv_mask, block_size), v_early)
            m_i, l_i, acc = _attend_tile(q, k, v, n, n_mask, seq_len, m_i, l_i, acc, scale, soft_cap, slopes,
                                         HAS_SOFT_CAP, HAS_ALIBI, KV_FP8, PRECISION, UPCAST)
    for n0 in range(first, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < end
        k = load_paged(k_cache_ptr, table_row, n, n_mask, kvh, kc_stride_b, kc_stride_s, kc_stride_h, d, d_mask,
                       block_size)
        v = load_paged(v_cache_ptr, table_row, n, n_mask, kvh, vc_stride_b, vc_stride_s, vc_stride_h, dv, dv_mask,
                       block_size)
        m_i, l_i, acc = _attend_tile(q, k, v, n, n_mask, seq_len, m_i, l_i, acc, scale, soft_cap, slopes,
                                     HAS_SOFT_CAP, HAS_ALIBI, KV_FP8, PRECISION, UPCAST)
    if KV_FP8:  # the weighted sum of v / v_scale, times v_scale
        acc = acc * v_scale

    if NUM_SPLITS == 1:
        _store_out(acc, m_i, l_i, sinks_ptr, out_ptr, b, heads, g_mask, dv, dv_mask, H, DV, HAS_SINKS)
    else:
        row = (b * H + heads) * NUM_SPLITS + split  # [B, H, NUM_SPLITS] partial layout
        tl.store(part_acc_ptr + row[:, None] * DV + dv[None, :], acc, mask=g_mask[:, None] & dv_mask[None, :])
        tl.store(part_ml_ptr + row * 2, m_i, mask=g_mask)
        tl.store(part_ml_ptr + row * 2 + 1, l_i, mask=g_mask)
        if MERGE_HERE:
            # The last split of this (sequence, kv head) to finish merges them all: every thread's
            # stores above, then (barrier) one thread's acq_rel count; the last program's loads
            # come after its own count, through L2 (.cg), as a CUTLASS semaphore hands over tiles.
            tl.debug_barrier()
            counter = counter_ptr + b * (H // GROUP) + kvh
            if tl.atomic_add(counter, 1, sem="acq_rel") == NUM_SPLITS - 1:
                _merge_heads(part_acc_ptr, part_ml_ptr, sinks_ptr, out_ptr, b * H + heads, g_mask, dv, dv_mask,
                             H, DV, NUM_SPLITS, HAS_SINKS)
                tl.atomic_xchg(counter, 0, sem="relaxed")  # ready for the next launch


@triton.jit
def _store_out(acc, m_i, l_i, sinks_ptr, out_ptr, b, heads, g_mask, dv, dv_mask, H, DV, HAS_SINKS: tl.constexpr):
    """One split's (acc, m, l) over all the keys -> the output rows of its heads (with the sinks'
    logits in the softmax's sum)."""
    if HAS_SINKS:
        sink = tl.load(sinks_ptr + heads, mask=g_mask, other=0.0).to(tl.float32) * 1.4426950408889634
        m_f = tl.maximum(m_i, sink)
        w = tl.exp2(m_i - m_f)
        l_i = l_i * w + tl.exp2(sink - m_f)
        acc = acc * w[:, None]
    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # no keys at all (an empty padding row): output 0
    out = acc / l_i[:, None]
    tl.store(out_ptr + b * H * DV + heads[:, None] * DV + dv[None, :], out.to(out_ptr.dtype.element_ty),
             mask=g_mask[:, None] & dv_mask[None, :])


@triton.jit
def _merge_heads(part_acc_ptr, part_ml_ptr, sinks_ptr, out_ptr, bh, bh_mask, dv, dv_mask, H, DV,
                 NUM_SPLITS: tl.constexpr, HAS_SINKS: tl.constexpr):
    """out rows bh [R] (sequence * H + head) from the partial (acc, m, l) of their NUM_SPLITS
    splits, as `_merge_kernel` merges one."""
    m_max = tl.full(bh.shape, float("-inf"), tl.float32)
    for s in tl.static_range(NUM_SPLITS):
        m_max = tl.maximum(m_max, tl.load(part_ml_ptr + (bh * NUM_SPLITS + s) * 2, mask=bh_mask,
                                          other=float("-inf"), cache_modifier=".cg"))
    if HAS_SINKS:
        sink = tl.load(sinks_ptr + bh % H, mask=bh_mask, other=0.0).to(tl.float32) * 1.4426950408889634
        m_max = tl.maximum(m_max, sink)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # every split empty
    l_tot = tl.zeros(bh.shape, tl.float32)
    acc = tl.zeros((bh.shape[0], dv.shape[0]), tl.float32)
    for s in tl.static_range(NUM_SPLITS):
        row = bh * NUM_SPLITS + s
        m = tl.load(part_ml_ptr + row * 2, mask=bh_mask, other=float("-inf"), cache_modifier=".cg")
        w = tl.exp2(m - m_max)
        l_tot += w * tl.load(part_ml_ptr + row * 2 + 1, mask=bh_mask, other=0.0, cache_modifier=".cg")
        acc += w[:, None] * tl.load(part_acc_ptr + row[:, None] * DV + dv[None, :],
                                    mask=bh_mask[:, None] & dv_mask[None, :], other=0.0, cache_modifier=".cg")
    if HAS_SINKS:
        l_tot += tl.exp2(sink - m_max)
    l_tot = tl.where(l_tot == 0.0, 1.0, l_tot)
    tl.store(out_ptr + bh[:, None] * DV + dv[None, :], (acc / l_tot[:, None]).to(out_ptr.dtype.element_ty),
             mask=bh_mask[:, None] & dv_mask[None, :])


@triton.jit
def _merge_kernel(
    part_acc_ptr, part_ml_ptr, sinks_ptr, out_ptr, H, DV,
    NUM_SPLITS: tl.constexpr, HAS_SINKS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
    PDL: tl.constexpr,
):
    """Merge the splits' (m, l, acc) of one (sequence, head): [NUM_SPLITS] partials -> out row."""
    wait_for_inputs(PDL)
    bh = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, BLOCK_S)
    s_mask = s < NUM_SPLITS
    dv = tl.arange(0, BLOCK_DV)
    dv_mask = dv < DV
    rows = bh * NUM_SPLITS + s
    m = tl.load(part_ml_ptr + rows * 2, mask=s_mask, other=float("-inf"))
    l = tl.load(part_ml_ptr + rows * 2 + 1, mask=s_mask, other=0.0)
    m_max = tl.max(m, axis=0)
    if HAS_SINKS:
        sink = tl.load(sinks_ptr + bh % H).to(tl.float32) * 1.4426950408889634
        m_max = tl.maximum(m_max, sink)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # every split empty
    w = tl.exp2(m - m_max)
    l_tot = tl.sum(l * w, axis=0)
    if HAS_SINKS:
        l_tot += tl.exp2(sink - m_max)
    l_tot = tl.where(l_tot == 0.0, 1.0, l_tot)
    acc = tl.load(part_acc_ptr + rows[:, None] * DV + dv[None, :], mask=s_mask[:, None] & dv_mask[None, :], other=0.0)
    out = tl.sum(acc * w[:, None], axis=0) / l_tot
    tl.store(out_ptr + bh * DV + dv, out.to(out_ptr.dtype.element_ty), mask=dv_mask)


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# Whether several splits merge in the decode kernel itself by default (benchmarks/decode_latency.py
# --compare-attention times both).
MERGE_IN_KERNEL = True

# Whether a captured decode step's attention loads its older keys and values before its PDL wait
# by default (`early_kv`; benchmarks/decode_latency.py --compare-early-kv times both).
EARLY_KV = True

# How the early kv path reads this step's token after its wait: as one row of k and of v (True), or
# as a tile of the split's first keys masked to that row (False). None (the default): as a row at head
# dims up to 64, as a tile above. The masked tiles are a second [BLOCK_N, D] tile of k and of v in
# registers: with them the kernel takes 255 registers a thread and spills (ptxas sm_90a, Triton 3.6,
# 4 warps: 32 bytes at head dim 64 with 128-key tiles, 72 at head dim 128 with 64-key tiles); as
# rows, 191 and no spill at head dim 64, 255 and 48 bytes at 128. Timed between the step's own
# neighbours (`benchmarks/attention_chain.py`, H100, session 26), the attention added, us a layer:
# 1B heads 3.86 / 3.89 / 4.12 as rows against 4.11 / 4.21 / 4.53 as tiles at 128 / 256 / 1000 keys;
# 8B TP=2 heads (dim 128) 9.06 against 8.27 at 256 keys. KILN_NEWEST_ROW=1 or 0 forces either.
NEWEST_ROW = {"1": True, "0": False}.get(os.environ.get("KILN_NEWEST_ROW", ""))

# The decode kernel's key tile, when its caller names none; 0: 128 keys at head dims up to 64, else
# 64. With the early kv loads, 64 keys at head dim 64 take 146 registers a thread and 32 at head dim
# 128 take 195, with no spill (the defaults: 255 and spills; see NEWEST_ROW). Both lost on the 1B
# step (H100, 5 interleaved rounds): 64 keys 1.046 and 32 keys 1.107 ms/token against 1.031 (32
# keys make 32 splits, a grid of 256 programs: too many for the early kv loads). KILN_DECODE_BLOCK_N=N
# for a process, `benchmarks/decode_latency.py --compare-switches decode_block_n=64`, `scale_out.py
# --compare-env KILN_DECODE_BLOCK_N=32`.
DECODE_BLOCK_N = int(os.environ.get("KILN_DECODE_BLOCK_N", "0"))

# The most splits a launch that names none takes. A decode graph is captured for the longest context
# (the block tables' width), and the split count follows that, so a short context fills few splits:
# the rest store empty partials that the merge reads. Timed between the step's own neighbours
# (`benchmarks/attention_chain.py`, H100, session 26; 8B TP=2 heads, 64-key tiles, tables of 2048
# keys), the attention added, us a layer, with 32 / 16 / 8 splits: 8.27 / 7.07 / 6.01 at 256 keys,
# 8.73 / 7.71 / 9.38 at 1024, 9.46 / 10.26 / 14.60 at 2000 (fewer splits mean more tiles one after
# another in each). 16 is the compromise. On the 1B's heads the graph has 8 splits of 128 keys, and
# 4 lost at 1000 keys (7.35 against 4.53). KILN_DECODE_MAX_SPLITS=N for a process.
DECODE_MAX_SPLITS = int(os.environ.get("KILN_DECODE_MAX_SPLITS", "16"))

# Per device: int32 arrival counters of the in-kernel merge, zero between launches (the last
# program of each (sequence, kv head) puts its counter back). Grown outside graph capture only: a
# buffer made while capturing would be the graph's, and a capture first runs the same step eagerly.
_counter_buffers: dict[torch.device, torch.Tensor] = {}


def _counters(device: torch.device, n: int) -> torch.Tensor | None:
    buf = _counter_buffers.get(device)
    if buf is None or buf.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        buf = _counter_buffers[device] = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
    return buf


def default_num_splits(batch: int, num_kv_heads: int, max_context: int, block_n: int, device: torch.device) -> int:
    """Enough splits for about four programs per multiprocessor, each at least one key tile long.
    A function of shapes only, so a CUDA-graph bucket always launches the same grid. (Measured on
    an H200, Llama-3.2-1B heads, 1K/4K context: batch 1 best with 16-32 splits, 8 with 8, 32 with
    2, 128 with 1.)"""
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 8
    want = triton.cdiv(4 * sms, max(1, batch * num_kv_heads))
    return max(1, min(want, triton.cdiv(max_context, block_n), DECODE_MAX_SPLITS))


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, scale: float, sliding_window: int = 0, soft_cap: float = 0.0,
    sinks: torch.Tensor | None = None, num_splits: int | None = None, block_n: int | None = None,
    num_warps: int = 4, num_stages: int = 2, k_scale: float = 1.0, v_scale: float = 1.0,
    alibi_slopes: torch.Tensor | None = None, merge_in_kernel: bool | None = None, early_kv: bool | None = None,
) -> torch.Tensor:
    """q [B, H, D], k_cache/v_cache [num_blocks, block_size, Hkv, D|Dv], block_tables [B, max_blocks],
    seq_lens [B] -> [B, H, Dv] in q's dtype. `num_splits` defaults to a function of the shapes;
    it, block_n, num_warps and num_stages are tuning knobs that leave the result unchanged.
    k_scale / v_scale: an fp8 cache's scales (unused by other caches). alibi_slopes [H] float32:
    ALiBi, slope * (k_pos - q_pos) added to the scores. merge_in_kernel: with several splits, the
    last program of each (sequence, kv head) to finish merges them (one launch); False, or no
    counters to be had (see `_counters`), launches the merge kernel after. None: MERGE_IN_KERNEL.
    early_kv: each program loads its first tile of keys and values (all but this step's token, at
    seq_len - 1) before its PDL wait, so those loads overlap the previous kernel. That holds only
    where the previous kernel writes no cached token but this step's and no seq_lens or block
    table entry: inside a captured decode step, whose kernels before the attention are the
    projection that writes this step's k and v (or the cache write) and, earlier, kernels that have
    finished (each waited on its own predecessor). None: EARLY_KV while a CUDA graph is being
    captured with PDL on, for a grid of at most two programs per multiprocessor. (On CPU it only
    changes the order of the loads: tested so under the interpreter.)"""
    B, H, D = q.shape
    check_cache("k_cache", k_cache)
    check_cache("v_cache", v_cache)
    HKV, DV = k_cache.shape[2], v_cache.shape[3]
    if H % HKV:
        raise ValueError(f"decode_attention: {H} query heads is not a multiple of {HKV} kv heads")
    out = q.new_empty((B, H, DV))
    if B == 0:
        return out
    q = q if q.stride(-1) == 1 else q.contiguous()
    block_size = k_cache.shape[1]
    block_d, block_dv = block_dim(D), block_dim(DV)
    if block_n is None:  # 128-key tiles measured best at head dim 64 (H200, before the early kv loads)
        block_n = DECODE_BLOCK_N or (128 if max(block_d, block_dv) <= 64 else 64)
    if num_splits is None:
        max_context = block_tables.shape[1] * block_size
        if sliding_window > 0:
            max_context = min(max_context, sliding_window)
        num_splits = default_num_splits(B, HKV, max_context, block_n, q.device)
    group = H // HKV
    block_g = block_dim(group)
    if num_splits > 1:
        part_acc = torch.empty((B, H, num_splits, DV), dtype=torch.float32, device=q.device)
        part_ml = torch.empty((B, H, num_splits, 2), dtype=torch.float32, device=q.device)
    else:
        part_acc = part_ml = out  # unused
    sinks_arg = sinks if sinks is not None else out
    alibi_arg = alibi_slopes.float().contiguous() if alibi_slopes is not None else out
    kc, vc = k_cache.stride(), v_cache.stride()
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    compute = q.dtype if fp8 else k_cache.dtype  # the dtype the dots multiply in
    if merge_in_kernel is None:
        merge_in_kernel = MERGE_IN_KERNEL
    counters = _counters(q.device, B * HKV) if num_splits > 1 and merge_in_kernel else None
    pdl = launch_args(q.device)
    if early_kv is None:
        # (the early tiles cost registers: 191-255 a thread against 113-144 at head dims 64-128
        # (ptxas, sm_90a), two blocks an SM instead of three or four. Worth it for a grid that fits
        # in one wave of two blocks an SM, a small batch's, which waits on latency, not throughput.)
        early_kv = (EARLY_KV and pdl["PDL"] and torch.cuda.is_current_stream_capturing()
                    and B * HKV * num_splits <= 2 * _num_sms(q.device.index if q.device.index is not None
                                                             else torch.cuda.current_device()))
    newest_row = NEWEST_ROW if NEWEST_ROW is not None else max(block_d, block_dv) <= 64
    _decode_kernel[(B, HKV, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, sinks_arg, alibi_arg, out, part_acc, part_ml,
        q.stride(0), q.stride(1), kc[0], kc[1], kc[2], vc[0], vc[1], vc[2],
        block_tables.stride(0), H, D, DV, group, block_size, scale * k_scale if fp8 else scale, soft_cap,
        sliding_window, float(v_scale), counters if counters is not None else seq_lens,
        MERGE_HERE=counters is not None, NUM_SPLITS=num_splits, HAS_WINDOW=sliding_window > 0,
        HAS_SOFT_CAP=soft_cap > 0, HAS_SINKS=sinks is not None,
        HAS_ALIBI=alibi_slopes is not None, KV_FP8=fp8, PRECISION=dot_precision(compute), UPCAST=dot_upcast(compute),
        EARLY_KV=early_kv, NEWEST_ROW=newest_row, BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_D=block_d,
        BLOCK_DV=block_dv, num_warps=num_warps, num_stages=num_stages, **pdl,
    )
    if num_splits > 1 and counters is None:
        _merge_kernel[(B * H,)](
            part_acc, part_ml, sinks_arg, out, H, DV,
            NUM_SPLITS=num_splits, HAS_SINKS=sinks is not None, BLOCK_S=triton.next_power_of_2(num_splits),
            BLOCK_DV=triton.next_power_of_2(DV), num_warps=4, **launch_args(q.device),
        )
    return out
