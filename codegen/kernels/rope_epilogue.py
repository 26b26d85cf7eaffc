"""The rotary epilogue of the q/k/v gemv (`quant_gemm.rope_gemv`, the CUDA form of a one-row
`rms_norm_linear_rope`): the gemv's output row is a merged q/k/v projection, [q heads | k heads |
v heads], D wide per q/k head and DV per v head. Its programs that compute q or k columns rotate
them before the store, as the rotary kernel would (cos and sin rounded to the output dtype, the
rotation in float32, the linear's output rounded first), and the k and v columns also go into the
paged cache at the token's slot (`kv_cache.to_cache`: an fp8 cache gets them scaled). So the
rotary + cache write (`rotary_kv_write`) is no launch of its own.

A rotation needs both members of each pair in one program. A program with the epilogue streams
its BLOCK_N weight rows as two tiles of BLOCK_N / 2: the pairs' first members and their partners
(`rope_rows`). NeoX pairs are (f, f + D/2), so the tiles are two runs of rows D/2 apart; GPT-J
pairs are (2i, 2i + 1), rows two apart; a program past the q and k columns (v) takes two plain
runs. Each tile's rows are an affine run, which keeps the weight addresses cheap: one tile of
interleaved pairs cost 35 more registers per thread in the bf16 tile (ptxas, sm_90a). Needs full
rotary (rotary_dim == D) and D a multiple of BLOCK_N.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kiln.codegen.kernels.kv_cache import to_cache

NO_ROPE, NEOX, GPTJ = 0, 1, 2


@triton.jit
def rope_rows(pid_n, rope_cols, D, HALF_N: tl.constexpr, ROPE: tl.constexpr):
    """(rows_a, rows_b, the pairs' frequencies) of program pid_n, each [HALF_N]: pair k is
    (rows_a[k], rows_b[k]) at frequency f[k] (meaningless for a v program, whose runs are plain)."""
    k = tl.arange(0, HALF_N)
    first = pid_n * 2 * HALF_N
    rotates = first < rope_cols
    if ROPE == 1:  # program j of a head: pairs j * HALF_N + k
        per_head = D // (2 * HALF_N)
        j = pid_n % per_head
        rows_a = tl.where(rotates, (pid_n // per_head) * D + j * HALF_N, first) + k
        rows_b = rows_a + tl.where(rotates, D // 2, HALF_N)
        f = j * HALF_N + k
    else:
        step = tl.where(rotates, 2, 1)
        rows_a = first + k * step
        rows_b = rows_a + tl.where(rotates, 1, HALF_N)
        f = (first % D) // 2 + k
    return rows_a, rows_b, f


@triton.jit
def rope_tables(pid_n, f, out_ptr, pos_ptr, cs_ptr, cs_stride, slot_ptr, rope_cols, D, HALF_N: tl.constexpr):
    """(cos, sin, slot) of the token: cos and sin [HALF_N] at the pairs' frequencies f (zeros for a
    v program), rounded to the output dtype as the reference rounds them. Called after the weight
    stream: any of these loaded before it, even the two scalars, took the 8 x 1024 bf16 tile from
    80 to 115 registers a thread (ptxas, sm_90a: the epilogue's addresses are then computed early
    and held), one block per SM fewer; here they cost a dependent load or two at the end."""
    rotates = (tl.zeros([HALF_N], dtype=tl.int32) + pid_n * 2 * HALF_N) < rope_cols
    row = cs_ptr + tl.load(pos_ptr).to(tl.int64) * cs_stride
    dtype = out_ptr.dtype.element_ty
    cos = tl.load(row + f, mask=rotates, other=0.0).to(dtype).to(tl.float32)
    sin = tl.load(row + D // 2 + f, mask=rotates, other=0.0).to(dtype).to(tl.float32)
    return cos, sin, tl.load(slot_ptr).to(tl.int64)


@triton.jit
def _store(y, rows, N, out_ptr, valid, block, offset, kc_ptr, vc_ptr, kc_sb, kc_ss, kc_sh, vc_sb, vc_ss, vc_sh,
           k_scale, v_scale, QD, KD, D, DV, KV_FP8: tl.constexpr, EXACT_ROUND: tl.constexpr):
    """One tile's columns to out, and its k or v columns to their cache."""
    in_row = rows < N
    tl.store(out_ptr + rows, y, mask=in_row)
    is_k = in_row & valid & (rows >= QD) & (rows < QD + KD)
    c = tl.where(is_k, rows - QD, 0)
    tl.store(kc_ptr + block * kc_sb + offset * kc_ss + (c // D) * kc_sh + c % D,
             to_cache(y, kc_ptr, k_scale, KV_FP8, EXACT_ROUND), mask=is_k)
    is_v = in_row & valid & (rows >= QD + KD)
    c = tl.where(is_v, rows - QD - KD, 0)
    tl.store(vc_ptr + block * vc_sb + offset * vc_ss + (c // DV) * vc_sh + c % DV,
             to_cache(y, vc_ptr, v_scale, KV_FP8, EXACT_ROUND), mask=is_v)


@triton.jit
def rope_store(vals_a, vals_b, rows_a, rows_b, pid_n, N, out_ptr, cos, sin, slot, kc_ptr, vc_ptr, kc_sb, kc_ss, kc_sh,
               vc_sb, vc_ss, vc_sh, block_size, k_scale, v_scale, QD, KD, D, DV, HALF_N: tl.constexpr,
               KV_FP8: tl.constexpr, EXACT_ROUND: tl.constexpr):
    """vals_a, vals_b [HALF_N] float32, the program's two tiles of the projection (scaled, biased):
    rounded to the output dtype, rotated as pairs (a q or k program), stored to out; their k and v
    columns also to the cache at `slot` (not for a negative slot, a padding token)."""
    dtype = out_ptr.dtype.element_ty
    x1, x2 = vals_a.to(dtype), vals_b.to(dtype)
    rotates = (tl.zeros([HALF_N], dtype=tl.int32) + pid_n * 2 * HALF_N) < QD + KD
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    x1 = tl.where(rotates, (a * cos - b * sin).to(dtype), x1)
    x2 = tl.where(rotates, (b * cos + a * sin).to(dtype), x2)
    # (the slot's test as a vector: Triton 3.9's interpreter cannot mask with tensor & scalar)
    valid = (tl.zeros([HALF_N], dtype=tl.int64) + slot) >= 0
    slot = tl.maximum(slot, 0)
    block, offset = slot // block_size, slot % block_size
    _store(x1, rows_a, N, out_ptr, valid, block, offset, kc_ptr, vc_ptr, kc_sb, kc_ss, kc_sh, vc_sb, vc_ss, vc_sh,
           k_scale, v_scale, QD, KD, D, DV, KV_FP8, EXACT_ROUND)
    _store(x2, rows_b, N, out_ptr, valid, block, offset, kc_ptr, vc_ptr, kc_sb, kc_ss, kc_sh, vc_sb, vc_ss, vc_sh,
           k_scale, v_scale, QD, KD, D, DV, KV_FP8, EXACT_ROUND)
