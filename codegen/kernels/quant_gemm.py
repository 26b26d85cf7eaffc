"""Quantized GEMMs: weight-only (8-bit weights, activations in the model dtype) and W8A8.

Same semantics as `kiln.ir.quant_ops.weight_only_linear` and `scaled_linear`:

- weight_only_linear: x [..., K] float32/float16/bfloat16, wq [N, K] int8 or float8_e4m3fn,
  w_scale [N] float32, bias [N] or None -> [..., N] in x's dtype. The 8-bit tile is converted
  to x's dtype (exactly: int8 and e4m3 values are all representable) for a tl.dot with float32
  accumulation (the gemv kernel multiplies in float32), and scaled per output channel in the
  epilogue (the reference rounds the dequantized weight to x's dtype first: the kernel is the
  more exact of the two).
- scaled_linear: xq [..., K] and wq [N, K] both int8 or both fp8, x_scale [..., 1] and w_scale
  [N] float32 -> (xq @ wq.T) * x_scale * w_scale (+ bias) in out_dtype. fp8 goes to
  `torch._scaled_mm` (cuBLASLt / CUTLASS row-wise scaling) where it takes the shape
  (`scaled_linear_backend`); int8, and fp8 where it does not, to the Triton kernels here,
  int8 with int32 accumulation (exact), fp8 with float32.

Two kernels, picked per call by `pick_config` from M (the tokens of the step):

- "gemv" (M == 1, batch-1 decode): no tensor cores. Each program streams a [BLOCK_N, BLOCK_K]
  weight tile per step (16-byte loads along K), multiplies by the broadcast activation chunk and
  accumulates elementwise in float32 (int32 for int8 x int8), reducing over K once at the end.
  The step is purely memory bound (every weight byte is read once, nothing is reused), so the
  tiling exists to keep enough bytes in flight: a small BLOCK_N gives N / BLOCK_N programs, about
  4 per SM, each with a few KB outstanding, and split-K adds programs when N is small.
  The gemv may also transform its input row first (a `Prologue`): an RMSNorm (with or without the
  residual add, whose sum it stores; `rms_norm_gemv`) or a gated activation over a (gate, up)
  row (`act_and_mul_gemv`). Each program reads the whole activation row anyway,
  so the norm's statistics cost a few KB of L2 reads per program instead of a launch of their own.
  And it may finish its output row: rotate a q/k/v projection and write k and v to the cache
  (`rope_gemv`, `rope_epilogue.py`), or send it to the peer rank at two ranks (`reduced_gemv`:
  each program sends its values as it stores them, for a receiving all-reduce launch after it, see
  `triton_ops.FUSED_ALL_REDUCE`).
- "dot" (everything else): a tiled tl.dot GEMM with float32 (int32) accumulation, grouped
  program order for L2 reuse at large M, BLOCK_M = 16 and a narrow BLOCK_N with split-K for
  small M (decode batches: still weight-bandwidth bound), 128 x 128 tiles for prefill.

Split-K: each program stores its partial tile to a float32 (int32) workspace [SPLIT_K, M, N], and
a second launch sums the partials in a fixed order (deterministic) and applies the epilogue. Two
launches in stream order need no inter-program synchronisation. (A single-launch version, where
the last program to arrive at a per-tile counter summed the partials, gave wrong sums when the
programs really ran concurrently on an H200; it is gone.)

Block sizes are overridable: pass `config=GemmConfig(...)` (benchmarks/kernels.py --sweep does).
The batch-1 defaults are measured (`_GEMV_TILES`); the others are reasoned: see `pick_config`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kiln.codegen.kernels.activation import ACTIVATIONS, act_and_mul
from kiln.codegen.kernels.pdl import launch_args, wait_for_inputs
from kiln.codegen.kernels.rope_epilogue import GPTJ, NEOX, NO_ROPE, rope_rows, rope_store, rope_tables
from kiln.codegen.kernels.quant import TL_DTYPES
from kiln.codegen.kernels.two_rank_all_reduce import (
    BLOCK as _ALL_REDUCE_BLOCK, MAX_SPINS, TwoRankAllReduce, ll_send, two_rank_all_reduce,
)

_QUANT_WEIGHT_DTYPES = (torch.int8, torch.float8_e4m3fn)


@dataclass(frozen=True)
class GemmConfig:
    """One launch's tiling. kernel: "gemv" (M == 1 only; block_m is ignored) or "dot". tiles (gemv
    only): the tiles of block_n rows each program streams (`_gemv_tiles_kernel`; 1: one, the plain
    gemv), loading the weights of `depth` steps ahead."""

    kernel: str = "dot"
    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8
    tiles: int = 1
    depth: int = 1

    def __post_init__(self):
        if self.kernel not in ("gemv", "dot"):
            raise ValueError(f"GemmConfig.kernel must be 'gemv' or 'dot', got {self.kernel!r}")
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"GemmConfig.{name} must be a power of two, got {v}")
        if self.kernel == "dot" and min(self.block_m, self.block_n, self.block_k) < 16:
            raise ValueError(f"GemmConfig: tl.dot needs blocks of at least 16, got {self}")
        if self.split_k < 1:
            raise ValueError(f"GemmConfig.split_k must be >= 1, got {self.split_k}")
        if self.tiles < 1 or self.depth not in (1, 2):
            raise ValueError(f"GemmConfig: tiles must be >= 1 and depth 1 or 2, got {self.tiles} and {self.depth}")
        if self.tiles > 1 and (self.kernel != "gemv" or self.split_k > 1):
            raise ValueError(f"GemmConfig: several tiles a program are the gemv's, without split K; got {self}")


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # the interpreter: an H100's count, so CPU tests see the GPU's choices


# The gemv converts fp8 weights by bits (`_e4m3_to_f32`) instead of through float16 when set: off
# until timed on a GPU (benchmarks/decode_latency.py --compare-fp8-conversion), see codegen/NOTES.md.
FP8_BY_BITS = False

# A norm prologue's statistics gathered in the product's own loop when set: each program sums w * (g * s)
# and s^2 over its row as it streams, and scales its sums by rsqrt(mean(s^2) + eps) at the end, where
# otherwise it reads the whole row once for the statistics, after its PDL wait and before its first
# product, and rounds the normalized row to x's dtype as rms_norm does. The same numbers but for
# those roundings (the product is linear in the row). One split only (a program must see the whole
# row). Session 23, H100: the 1B step 1.027 against 1.050 ms/token (`benchmarks/decode_latency.py
# --compare-norm-at-end`), the 8B TP=2 step 3.404 against 3.458 (`benchmarks/scale_out.py
# --compare-norm-at-end`). KILN_NORM_AT_END=0 turns it off for a process.
NORM_AT_END = os.environ.get("KILN_NORM_AT_END", "1") == "1"
# With the norm at the end, ptxas (Triton 3.6, sm_90a) gives the rotary gemv's 8 x 1024 / 8-warp tile 91-93
# registers a thread where the norm first needed 80: two blocks of 8 warps an SM instead of three, so the
# 1B q/k/v gemv's 384 programs would take two waves. Capped at 80 it compiles without spills.
_ROPE_AT_END_MAXNREG = 80

# Split-K is off by default: its second launch costs about what it could save at M=1 on these
# shapes, and it has not been timed since the single-launch version was replaced. A config may ask for it.
SPLIT_K_BY_DEFAULT = False


# Batch-1 tiles (block_n, block_k, num_warps[, tiles a program, steps loaded ahead]) by weight width and
# matrix role, measured on an H100 as chains of 8 launches with PDL (`benchmarks/kernels.py --sweep
# --sweep-chain 8`, Llama-3.2-1B shapes; benchmarks/RESULTS.md): each was the best or within 3% of it.
# The tiles that win differ by role, not by a rule of thumb on bytes: wide outputs (gate_up, lm_head)
# want many short programs, long rows (down's K=8192) and small matrices (o) 2048-wide K steps.
# "deep" (16-bit weights only): the matrices of Llama-3.1-8B, whole or halved by TP=2 (K >= 4096), swept
# in session 20 (`--sweep-model llama-8b` / `llama-8b-tp2`): 4 x 2048 x 8 was the best or within 1%
# of it for every one of them; the 1B roles they fell into were 1-11% slower (TP=2's down: 10%).
# "ROLE+rope" entries (none now) would give the q/k/v gemv with the rotary epilogue (`rope_gemv`) a
# tile of its own. Session 22 timed one: at TP=2's 3072 x 4096, 8 x 1024 x 8 took 12.85 us against
# deep's 14.03 as chains of 8 (`benchmarks/qkv_gemv.py`, H100), but the whole TP=2 step with it and
# with 4 x 1024 x 4 for TP=2's o (best in session 20's sweep) was no faster (3.402 against 3.374 ms/token,
# `scale_out.py --compare-tiles`). A "+rope" entry streams one tile a program: the tiles kernel with the
# rotary epilogue lost (session 30, H200, the int8 1B step: 0.707 and 0.746 against 0.663 ms/token with
# 8bit.narrow+rope 4x2048x8x2 and 2x2048x8x2), and is gone.
_GEMV_TILES = {
    # 16-bit weights (float_linear)
    (2, "vocab"): (4, 1024, 4), (2, "wide"): (4, 1024, 4), (2, "long"): (8, 2048, 8),
    (2, "small"): (8, 2048, 8), (2, "narrow"): (8, 1024, 8), (2, "deep"): (4, 2048, 8),
    # 8-bit weights (int8 and fp8 alike). gate/up ("wide") and down ("long") stream several tiles a program
    # (`_gemv_tiles_kernel`): session 29, H100, the 1B step in 3 rounds, int8 0.742 against 0.837 ms/token
    # with the plain (16, 512, 8) and (4, 2048, 8), fp8 0.759 against 0.840 (`gpu_session.sh gemv-tiles`).
    # bf16's roles lost that way in the step (1.065 against 1.005 with wide 4x2048x8x4x2, long 2x8192x8x2,
    # small 2x2048x4x2), though each won as a chain of its own (`benchmarks/gemv_tiles.py`).
    (1, "vocab"): (16, 256, 4), (1, "wide"): (2, 2048, 4, 4, 1), (1, "long"): (4, 8192, 8, 2, 1),
    (1, "small"): (4, 2048, 4), (1, "narrow"): (4, 1024, 4),
}
# 8-bit activations (W8A8 at batch 1) take the plain gemv, not the tiles kernel: where a role's 8-bit tile
# streams several tiles, they keep the plain tile it had before (session 29 timed weight-only rows only).
_W8A8_GEMV_TILES = {"wide": (16, 512, 8), "long": (4, 2048, 8)}


def parse_gemv_tiles(spec: str) -> dict:
    """"small=8x1024x8,8bit.long=4x2048x8x2,deep+rope=4x2048x8" -> {(2, "small"): (8, 1024, 8), (1, "long"):
    (4, 2048, 8, 2, 1), (2, "deep+rope"): (4, 2048, 8)}: `_GEMV_TILES` entries (rows x K step x warps, then
    optionally tiles a program and the steps loaded ahead, default 1; "8bit." for the 8-bit weights' roles,
    "+rope" for the q/k/v gemv with the rotary epilogue), for benchmarks to time other tilings
    (`KILN_GEMV_TILES`, `benchmarks/decode_latency.py --compare-gemv-tiles`)."""
    tiles = {}
    for item in filter(None, (i.strip() for i in spec.split(","))):
        role, _, tiling = item.partition("=")
        width, role = (1, role[5:]) if role.startswith("8bit.") else (2, role)
        if (width, role.removesuffix("+rope")) not in _GEMV_TILES:
            raise ValueError(f"gemv tiles: unknown role {role!r} in {item!r} (roles: "
                             f"{sorted({r for _, r in _GEMV_TILES})})")
        try:
            values = tuple(int(v) for v in tiling.split("x"))
        except ValueError:
            values = ()
        if len(values) not in (3, 4, 5):
            raise ValueError(f"gemv tiles: {item!r} is not ROLE=ROWSxKxWARPS[xTILES[xDEPTH]]")
        if role.endswith("+rope") and values[3:] not in ((), (1,), (1, 1)):
            raise ValueError(f"gemv tiles: {item!r}: the rotary gemv streams one tile a program")
        tiles[(width, role)] = values if len(values) == 3 else (values + (1,))[:5]
    return tiles


# KILN_GEMV_TILES (a `parse_gemv_tiles` spec) overrides tiles for a process: how benchmarks/scale_out.py
# times other tilings in its TP=2 workers, which it starts as processes of their own.
_GEMV_TILES.update(parse_gemv_tiles(os.environ.get("KILN_GEMV_TILES", "")))


def _gemv_role(N: int, K: int, width: int = 2) -> str:
    if N >= 65536:
        return "vocab"
    if width == 2 and K >= 4096 and N >= 3072:
        return "deep"
    if N >= 16384:
        return "wide"
    if K >= 8192:
        return "long"
    return "small" if N <= 2048 else "narrow"


def pick_config(M: int, N: int, K: int, x_dtype: torch.dtype, num_sms: int = 132,
                w_dtype: torch.dtype = torch.int8, rope: bool = False) -> GemmConfig:
    """The tiling for an [M, K] x [N, K]^T product (x_dtype: the A operand's, w_dtype the weight's).

    M == 1 is weight streaming: the measured `_GEMV_TILES`, and split K when even 4-row tiles leave
    SMs idle (N < ~1K on an H100), never below 2 K-steps a split. M <= 16 is still bandwidth bound:
    16-row dot tiles, 32-column tiles, split-K up to ~2 programs per SM. Larger M moves to
    compute-bound tiles (64 x 128, then 128 x 128 with 8 warps); 8-bit A operands take twice the K
    per step. rope: the q/k/v gemv with the rotary epilogue (`rope_gemv`), which takes its role's
    "+rope" tile where `_GEMV_TILES` has one.
    """
    eight_bit_a = x_dtype in _QUANT_WEIGHT_DTYPES
    if M == 1:
        width = 1 if w_dtype.itemsize == 1 else 2
        role = _gemv_role(N, K, width)
        tile = _GEMV_TILES.get((width, role + "+rope")) if rope else None
        block_n, block_k, num_warps, *stream = tile or _GEMV_TILES[(width, role)]
        tiles, depth = stream or (1, 1)
        if eight_bit_a and tiles > 1:
            block_n, block_k, num_warps = _W8A8_GEMV_TILES.get(role, (block_n, block_k, num_warps))
            tiles, depth = 1, 1
        block_k = min(block_k, triton.next_power_of_2(K))
        split_k = 1
        programs = triton.cdiv(N, block_n)
        if programs < 2 * num_sms:  # too few rows to fill the SMs: split K as well
            split_k = max(split_k, min(triton.cdiv(4 * num_sms, programs), K // (2 * block_k)))
        split_k = split_k if SPLIT_K_BY_DEFAULT and tiles == 1 else 1
        return GemmConfig("gemv", 1, block_n, block_k, split_k, num_warps=num_warps, num_stages=3, tiles=tiles,
                          depth=depth)
    if M <= 16:
        block_k = 256 if K >= 256 else max(16, triton.next_power_of_2(K))
        tiles = triton.cdiv(N, 32)
        split_k = 1
        if tiles < 2 * num_sms:
            split_k = max(1, min(triton.cdiv(2 * num_sms, tiles), K // (2 * block_k)))
        split_k = split_k if SPLIT_K_BY_DEFAULT else 1
        return GemmConfig("dot", 16, 32, block_k, split_k, num_warps=4, num_stages=4)
    block_k = 128 if eight_bit_a else 64
    if M <= 64:
        block_m = 64 if M > 32 else 32
        tiles = triton.cdiv(M, block_m) * triton.cdiv(N, 64)
        split_k = 1
        if tiles < num_sms:
            split_k = max(1, min(triton.cdiv(num_sms, tiles), K // (4 * block_k)))
        split_k = split_k if SPLIT_K_BY_DEFAULT else 1
        return GemmConfig("dot", block_m, 64, block_k, split_k, num_warps=4, num_stages=4)
    if M <= 256:
        return GemmConfig("dot", 64, 128, block_k, 1, num_warps=4, num_stages=4)
    return GemmConfig("dot", 128, 128, block_k, 1, num_warps=8, num_stages=4 if eight_bit_a else 3)


# ---------------------------------------------------------------- kernels


@triton.jit
def _int8_to_f32(w):
    """int8 -> float32 exactly without I2F (16 per SM per clock on Hopper, about the rate int8
    weights arrive at): v + 0x4B000080 has the bits of 2^23 + 128 + v, so subtracting it leaves v."""
    return (w.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0


@triton.jit
def _e4m3_to_f32(w):
    """float8_e4m3fn -> float32 exactly, by bits: the byte's sign to bit 31 and its exponent and
    mantissa under float32's (bits 26..20), which reads as the value times 2^-120 (e4m3 subnormals
    become float32 subnormals, kept: Triton's float multiplies do not flush them), then times 2^120.
    Integer ops and one multiply on full-rate pipes, where `w.to(tl.float32)` converts through
    float16 on the quarter-rate conversion pipe. (No NaN: quantized weights are clamped.)"""
    u = w.to(tl.uint8, bitcast=True).to(tl.int32)
    bits = ((u & 0x80) << 24) | ((u & 0x7F) << 20)
    return bits.to(tl.float32, bitcast=True) * 1.329227995784916e36


@triton.jit
def _dequant(w, DTYPE: tl.constexpr, W_INT8: tl.constexpr):
    """An 8-bit weight tile in DTYPE (exact). int8 -> float16 by the same trick at 2^10."""
    if W_INT8:
        if DTYPE == tl.float16:
            return (w.to(tl.int16) + 0x6480).to(tl.float16, bitcast=True) - 1152.0
        return _int8_to_f32(w).to(DTYPE)
    return w.to(DTYPE)


@triton.jit
def _epilogue(acc, rm, rn, M, N, out_ptr, stride_om, w_scale_ptr, x_scale_ptr, bias_ptr,
              HAS_X_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, ROUND: tl.constexpr):
    """acc [BM, BN] -> (acc * x_scale[m]) * w_scale[n] (+ bias[n]) in out's dtype, stored; returns
    them. ROUND (a dtype, or None): rounded to it first (the logits: the model dtype's product,
    stored as float32, without a cast kernel after)."""
    out = acc.to(tl.float32)
    if HAS_X_SCALE:
        out = out * tl.load(x_scale_ptr + rm, mask=rm < M, other=0.0)[:, None]
    out = out * tl.load(w_scale_ptr + rn, mask=rn < N, other=0.0)[None, :]
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if ROUND is not None:
        out = out.to(ROUND)
    out = out.to(out_ptr.dtype.element_ty)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    tl.store(out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :], out, mask=mask)
    return out


@triton.jit
def _finish(acc, rm, rn, M, N, pid_k, out_ptr, stride_om, w_scale_ptr, x_scale_ptr, bias_ptr, part_ptr, plane,
            HAS_X_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, ROUND: tl.constexpr):
    """The epilogue; with K split, the partial tile's store to its plane of the workspace instead."""
    if SPLIT_K == 1:
        _epilogue(acc, rm, rn, M, N, out_ptr, stride_om, w_scale_ptr, x_scale_ptr, bias_ptr, HAS_X_SCALE, HAS_BIAS,
                  ROUND)
    else:
        mask = (rm < M)[:, None] & (rn < N)[None, :]
        part = part_ptr + pid_k.to(tl.int64) * plane + rm[:, None].to(tl.int64) * N + rn[None, :]
        tl.store(part, acc, mask=mask)


@triton.jit
def _split_k_sum_kernel(part_ptr, out_ptr, w_scale_ptr, x_scale_ptr, bias_ptr, M, N, stride_om, plane,
                        HAS_X_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr, ROUND: tl.constexpr):
    """out = epilogue(sum of the SPLIT_K partial planes), summed in plane order."""
    wait_for_inputs(PDL)
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    part = part_ptr + rm[:, None].to(tl.int64) * N + rn[None, :]
    total = tl.load(part, mask=mask, other=0)
    for _ in range(1, SPLIT_K):
        part += plane
        total += tl.load(part, mask=mask, other=0)
    _epilogue(total, rm, rn, M, N, out_ptr, stride_om, w_scale_ptr, x_scale_ptr, bias_ptr, HAS_X_SCALE, HAS_BIAS,
              ROUND)


@triton.jit
def _gemv_product(acc, w, x, ACC_INT: tl.constexpr, W_INT8: tl.constexpr, FP8_BITS: tl.constexpr):
    """acc + w * x (broadcast over the tile's rows), in the accumulator's type. FP8_BITS: w is
    e4m3, converted by `_e4m3_to_f32`. (One return: Triton 3.6 failed to compile the int32 branch
    written as early returns.)"""
    if ACC_INT:
        product = w.to(tl.int32) * x.to(tl.int32)[None, :]
    elif W_INT8:
        product = _int8_to_f32(w) * x.to(tl.float32)[None, :]
    elif FP8_BITS:
        product = _e4m3_to_f32(w) * x.to(tl.float32)[None, :]
    else:
        product = w.to(tl.float32) * x.to(tl.float32)[None, :]
    return acc + product


@triton.jit
def _load(ptrs, mask, EVEN: tl.constexpr):
    if EVEN:
        v = tl.load(ptrs)
    else:
        v = tl.load(ptrs, mask=mask, other=0.0)
    return v


# What the gemv does to its input row before the product (`Prologue.kind`, the PROLOGUE constexpr);
# the gated ones in `activation.ACTIVATIONS`' order, from SILU_AND_MUL on
NO_PROLOGUE, RMS_NORM, ADD_RMS_NORM, SILU_AND_MUL, GELU_AND_MUL, GELU_TANH_AND_MUL = range(6)


@triton.jit
def _norm_source(x_ptr, res_ptr, offs, mask, K, PROLOGUE: tl.constexpr, EVEN: tl.constexpr, X_COPIES: tl.constexpr):
    """The row the norm reads at offs: x, or (ADD_RMS_NORM) x + residual rounded to x's dtype, as
    add_rms_norm sums it. X_COPIES > 0 (ADD_RMS_NORM only): x is that many float32 rows K apart
    whose sum, rounded to the residual's dtype, is the row (`fused_mlp.mlp_gemv`'s output)."""
    s = _load(x_ptr + offs, mask, EVEN)
    if X_COPIES > 0:
        total = s.to(tl.float32)
        for c in tl.static_range(1, X_COPIES):
            total += _load(x_ptr + c * K + offs, mask, EVEN).to(tl.float32)
        s = total.to(res_ptr.dtype.element_ty)
    if PROLOGUE == 2:
        s = (s.to(tl.float32) + _load(res_ptr + offs, mask, EVEN).to(tl.float32)).to(s.dtype)
    return s


@triton.jit
def _norm_rstd(x_ptr, res_ptr, sum_ptr, K, eps, program, PROLOGUE: tl.constexpr, BLOCK_K: tl.constexpr,
               K_CHUNKS: tl.constexpr, EVEN: tl.constexpr, X_COPIES: tl.constexpr):
    """rsqrt(mean(s^2) + eps) over the whole row s; with a residual, the first program (`program`
    == 0) also stores s (the op's second output). Every program reads the row (from L2: a few KB);
    the chunks are unrolled so their loads are in flight together."""
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for c in tl.static_range(K_CHUNKS):
        offs = c * BLOCK_K + rk
        mask = offs < K
        s = _norm_source(x_ptr, res_ptr, offs, mask, K, PROLOGUE, EVEN, X_COPIES)
        if PROLOGUE == 2:
            tl.store(sum_ptr + offs, s, mask=mask & (rk * 0 + program == 0))
        sf = s.to(tl.float32)
        acc += sf * sf
    return tl.rsqrt(tl.sum(acc, axis=0) / K + eps)


@triton.jit
def _gemv_input(x_ptr, res_ptr, g_ptr, offs, mask, K, rstd, PROLOGUE: tl.constexpr, EVEN: tl.constexpr,
                X_COPIES: tl.constexpr):
    """The activation chunk at offs, rounded as the ops it replaces round it: x; the RMSNorm of the
    row (statistics in float32, the scale by the norm weight in the row's dtype); or act(gate) * up
    of a row holding (gate, up), 2K wide (`act_and_mul`)."""
    if PROLOGUE == 0:
        x = _load(x_ptr + offs, mask, EVEN)
    elif PROLOGUE <= 2:
        s = _norm_source(x_ptr, res_ptr, offs, mask, K, PROLOGUE, EVEN, X_COPIES)
        y = (s.to(tl.float32) * rstd).to(s.dtype)
        g = _load(g_ptr + offs, mask, EVEN)
        x = (g.to(tl.float32) * y.to(tl.float32)).to(s.dtype)
    else:
        gate = _load(x_ptr + offs, mask, EVEN)
        up = _load(x_ptr + K + offs, mask, EVEN)
        x = act_and_mul(gate, up, PROLOGUE - 3)
    return x


@triton.jit
def _norm_input_at_end(x_ptr, res_ptr, g_ptr, offs, mask, K, PROLOGUE: tl.constexpr, EVEN: tl.constexpr,
                       X_COPIES: tl.constexpr):
    """(g * s in float32, the sum of s^2) at offs, s the row the norm reads (x, or x + residual
    rounded to x's dtype): NORM_AT_END's input, the row not yet scaled by its rstd. (The squares
    summed here, a scalar, rather than kept per column to the end: fewer registers through the
    stream.)"""
    s = _norm_source(x_ptr, res_ptr, offs, mask, K, PROLOGUE, EVEN, X_COPIES)
    sf = s.to(tl.float32)
    return _load(g_ptr + offs, mask, EVEN).to(tl.float32) * sf, tl.sum(sf * sf, axis=0)


@triton.jit
def _store_sum(x_ptr, res_ptr, sum_ptr, K, BLOCK_K: tl.constexpr, EVEN: tl.constexpr, X_COPIES: tl.constexpr,
               PROLOGUE: tl.constexpr):
    """The row the norm reads, stored to sum_ptr: x + residual rounded to x's dtype (ADD_RMS_NORM:
    add_rms_norm's second output), or x (RMS_NORM: a row gathered from a table, X_INDEX). One
    program's pass over the row, apart from its product's loop (a masked store in that loop kept
    the sum live in every program: 20-40 more registers a thread)."""
    for k in range(0, K, BLOCK_K):
        offs = k + tl.arange(0, BLOCK_K)
        tl.store(sum_ptr + offs, _norm_source(x_ptr, res_ptr, offs, offs < K, K, PROLOGUE, EVEN, X_COPIES),
                 mask=offs < K)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, w_scale_ptr, x_scale_ptr, bias_ptr, out_ptr, part_ptr, res_ptr, g_ptr, sum_ptr,
    N, K, stride_wn, k_per_split, plane, eps,
    pos_ptr, cs_ptr, slot_ptr, kc_ptr, vc_ptr, cs_stride, kc_sb, kc_ss, kc_sh, vc_sb, vc_ss, vc_sh, block_size,
    k_scale, v_scale, QD, KD, DV,
    peer_recv_addr, epochs_ptr, slot_stride,
    HAS_X_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, ACC_INT: tl.constexpr, W_INT8: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
    PDL: tl.constexpr, EARLY_W: tl.constexpr, PROLOGUE: tl.constexpr, K_CHUNKS: tl.constexpr,
    FP8_BITS: tl.constexpr, ROUND: tl.constexpr, ROPE: tl.constexpr, KV_FP8: tl.constexpr,
    EXACT_ROUND: tl.constexpr, HEAD_D: tl.constexpr, SEND: tl.constexpr, PER_WORD: tl.constexpr,
    NORM_AT_END: tl.constexpr, X_COPIES: tl.constexpr, X_INDEX: tl.constexpr,
):
    """out = x @ w.T for one row x, scaled per channel. PROLOGUE: the row is first normalized
    (RMS_NORM; ADD_RMS_NORM, which also stores x + residual to sum_ptr) or gated (x holds (gate,
    up): act(gate) * up), see the constants above; with NORM_AT_END (one split) the norm's
    statistics are gathered in the product's loop and its scale applied to the sums (see the
    switch). X_INDEX (RMS_NORM only, where no residual is read): x is a table of rows K long and
    res_ptr points at the index of the row to read (an embedding's token id, read after the PDL
    wait), which the first program also stores to sum_ptr (the embedding's output). ROPE (NEOX,
    GPTJ): out is a q/k/v projection whose q and k heads are rotated and whose k and v go into the
    cache (`rope_epilogue.py`; the arguments from pos_ptr to DV are its, unused otherwise). SEND: out is this rank's partial row of a sum over two ranks, and each
    program sends its values to the peer as it stores them (`ll_send`; the arguments from
    peer_recv_addr on are its), for a receiving all-reduce launch after it."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    # with ROPE, two tiles of BLOCK_N / 2 rows, a rotation pair's members (rope_epilogue.rope_rows)
    ROWS: tl.constexpr = BLOCK_N // 2 if ROPE != 0 else BLOCK_N
    if ROPE != 0:
        rn, rn_b, freqs = rope_rows(pid_n, QD + KD, HEAD_D, ROWS, ROPE)
    else:
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # rows past N read row N-1 (no mask on the weight stream) and are never stored
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    offs = k_lo + rk
    w_ptrs = w_ptr + tl.minimum(rn, N - 1)[:, None].to(tl.int64) * stride_wn + offs[None, :]
    if ROPE != 0:
        w_ptrs_b = w_ptr + tl.minimum(rn_b, N - 1)[:, None].to(tl.int64) * stride_wn + offs[None, :]
    # The first K step is peeled: with EARLY_W its weight tile is loaded before waiting for the
    # previous kernel, so the stream starts while that kernel finishes (see pdl.py). Every split
    # has at least one step (the launcher makes no empty split).
    if not EARLY_W:
        wait_for_inputs(PDL)
    w = _load(w_ptrs, (offs < K)[None, :], EVEN_K)
    if ROPE != 0:
        w_b = _load(w_ptrs_b, (offs < K)[None, :], EVEN_K)
    if EARLY_W:
        wait_for_inputs(PDL)
    if X_INDEX:
        x_ptr += tl.load(res_ptr).to(tl.int64) * K
        if pid_n + pid_k == 0:
            _store_sum(x_ptr, res_ptr, sum_ptr, K, BLOCK_K, EVEN_K, X_COPIES, 1)
    rstd = 1.0
    if NORM_AT_END:
        if PROLOGUE == 2:
            if pid_n == 0:
                _store_sum(x_ptr, res_ptr, sum_ptr, K, BLOCK_K, EVEN_K, X_COPIES, 2)
        x, squares = _norm_input_at_end(x_ptr, res_ptr, g_ptr, offs, offs < K, K, PROLOGUE, EVEN_K, X_COPIES)
    else:
        if PROLOGUE == 1 or PROLOGUE == 2:
            rstd = _norm_rstd(x_ptr, res_ptr, sum_ptr, K, eps, pid_n + pid_k, PROLOGUE, BLOCK_K, K_CHUNKS, EVEN_K,
                              X_COPIES)
        x = _gemv_input(x_ptr, res_ptr, g_ptr, offs, offs < K, K, rstd, PROLOGUE, EVEN_K, X_COPIES)
    if ACC_INT:
        acc = tl.zeros((ROWS, BLOCK_K), dtype=tl.int32)
    else:
        acc = tl.zeros((ROWS, BLOCK_K), dtype=tl.float32)
    acc = _gemv_product(acc, w, x, ACC_INT, W_INT8, FP8_BITS)
    if ROPE != 0:
        acc_b = _gemv_product(tl.zeros((ROWS, BLOCK_K), dtype=tl.float32), w_b, x, False, W_INT8, FP8_BITS)
    for k in range(k_lo + BLOCK_K, k_hi, BLOCK_K):
        offs = k + rk
        w_ptrs += BLOCK_K
        w = _load(w_ptrs, (offs < K)[None, :], EVEN_K)
        if ROPE != 0:
            w_ptrs_b += BLOCK_K
            w_b = _load(w_ptrs_b, (offs < K)[None, :], EVEN_K)
        if NORM_AT_END:
            x, step_squares = _norm_input_at_end(x_ptr, res_ptr, g_ptr, offs, offs < K, K, PROLOGUE, EVEN_K,
                                                 X_COPIES)
            squares += step_squares
        else:
            x = _gemv_input(x_ptr, res_ptr, g_ptr, offs, offs < K, K, rstd, PROLOGUE, EVEN_K, X_COPIES)
        acc = _gemv_product(acc, w, x, ACC_INT, W_INT8, FP8_BITS)
        if ROPE != 0:
            acc_b = _gemv_product(acc_b, w_b, x, False, W_INT8, FP8_BITS)
    sums_scale = 1.0  # (the sums' factor: the row's rstd when it was not applied to the row)
    if NORM_AT_END:  # (masked columns past K loaded 0: they add nothing)
        sums_scale = tl.rsqrt(squares / K + eps)
    if ROPE == 0:
        total = tl.sum(acc, axis=1)[None, :]
        if NORM_AT_END:  # (only then: an int32 total must stay exact for the split-K workspace)
            total = total * sums_scale
        rm = tl.arange(0, 1)
        if SEND:  # (one split: the launcher makes it so)
            vals = _epilogue(total, rm, rn, 1, N, out_ptr, N, w_scale_ptr, x_scale_ptr, bias_ptr, HAS_X_SCALE, HAS_BIAS,
                             ROUND)
            ll_send(tl.reshape(vals, (BLOCK_N,)), pid_n * BLOCK_N, N, peer_recv_addr, epochs_ptr, slot_stride,
                    BLOCK_N, PER_WORD)
        else:
            _finish(total, rm, rn, 1, N, pid_k, out_ptr, N, w_scale_ptr, x_scale_ptr, bias_ptr, part_ptr, plane,
                    HAS_X_SCALE, HAS_BIAS, SPLIT_K, ROUND)
    else:  # (the launcher makes it one split, without x scales; the tables only now: see rope_tables)
        cos, sin, slot = rope_tables(pid_n, freqs, out_ptr, pos_ptr, cs_ptr, cs_stride, slot_ptr, QD + KD, HEAD_D, ROWS)
        vals_a = tl.sum(acc, axis=1) * sums_scale * tl.load(w_scale_ptr + rn, mask=rn < N, other=0.0)
        vals_b = tl.sum(acc_b, axis=1) * sums_scale * tl.load(w_scale_ptr + rn_b, mask=rn_b < N, other=0.0)
        if HAS_BIAS:
            vals_a += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
            vals_b += tl.load(bias_ptr + rn_b, mask=rn_b < N, other=0.0).to(tl.float32)
        rope_store(vals_a, vals_b, rn, rn_b, pid_n, N, out_ptr, cos, sin, slot, kc_ptr, vc_ptr, kc_sb, kc_ss, kc_sh,
                   vc_sb, vc_ss, vc_sh, block_size, k_scale, v_scale, QD, KD, HEAD_D, DV, ROWS, KV_FP8, EXACT_ROUND)


@triton.jit
def _stream_step(w_ptr, N, K, stride_wn, pid, step, TILES: tl.constexpr, K_STEPS: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """The weights of step `step` of a `_gemv_tiles_kernel` program's stream: its tiles are
    consecutive, each in K_STEPS steps along K. Rows past N read row N-1 and are never stored."""
    rn = (pid * TILES + step // K_STEPS) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs = (step % K_STEPS) * BLOCK_K + tl.arange(0, BLOCK_K)
    ptrs = w_ptr + tl.minimum(rn, N - 1)[:, None].to(tl.int64) * stride_wn + offs[None, :]
    return _load(ptrs, (offs < K)[None, :], EVEN_K)


@triton.jit
def _gemv_tiles_kernel(
    x_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr, res_ptr, g_ptr, sum_ptr, N, K, stride_wn, eps,
    HAS_BIAS: tl.constexpr, W_INT8: tl.constexpr, FP8_BITS: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, K_STEPS: tl.constexpr, TILES: tl.constexpr, DEPTH: tl.constexpr,
    EVEN_K: tl.constexpr, PDL: tl.constexpr, EARLY_W: tl.constexpr, PROLOGUE: tl.constexpr, ROUND: tl.constexpr,
):
    """`_gemv_kernel`'s product for one row (float or 8-bit weight-only, a prologue, no split, no
    rope, no sum over ranks), each program streaming TILES consecutive tiles of BLOCK_N rows: a
    stream of TILES * K_STEPS steps, unrolled, in which step i + DEPTH's weights (DEPTH 1 or 2)
    are loaded before step i's product, so a program's loads do not drain between its tiles as
    they do between programs. With one K step a tile (BLOCK_K >= K) the prologue's row is made
    once a program, not once a tile. Its norm is the reference's (statistics first, then the
    row rounded as rms_norm rounds it), not NORM_AT_END's."""
    pid = tl.program_id(0)
    STEPS: tl.constexpr = TILES * K_STEPS
    rk = tl.arange(0, BLOCK_K)
    if not EARLY_W:
        wait_for_inputs(PDL)
    w_a = _stream_step(w_ptr, N, K, stride_wn, pid, 0, TILES, K_STEPS, BLOCK_N, BLOCK_K, EVEN_K)
    w_b = w_a
    if DEPTH == 2 and STEPS > 1:
        w_b = _stream_step(w_ptr, N, K, stride_wn, pid, 1, TILES, K_STEPS, BLOCK_N, BLOCK_K, EVEN_K)
    if EARLY_W:
        wait_for_inputs(PDL)
    rstd = 1.0
    if PROLOGUE == 1 or PROLOGUE == 2:
        rstd = _norm_rstd(x_ptr, res_ptr, sum_ptr, K, eps, pid, PROLOGUE, BLOCK_K, K_STEPS, EVEN_K, 0)
    if K_STEPS == 1:
        x_row = _gemv_input(x_ptr, res_ptr, g_ptr, rk, rk < K, K, rstd, PROLOGUE, EVEN_K, 0)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for i in tl.static_range(STEPS):
        w = w_a
        w_next = w_a
        if i + DEPTH < STEPS:
            w_next = _stream_step(w_ptr, N, K, stride_wn, pid, i + DEPTH, TILES, K_STEPS, BLOCK_N, BLOCK_K, EVEN_K)
        if DEPTH == 2:
            w_a = w_b
            w_b = w_next
        else:
            w_a = w_next
        if K_STEPS == 1:
            x = x_row
        else:
            offs = (i % K_STEPS) * BLOCK_K + rk
            x = _gemv_input(x_ptr, res_ptr, g_ptr, offs, offs < K, K, rstd, PROLOGUE, EVEN_K, 0)
        acc = _gemv_product(acc, w, x, False, W_INT8, FP8_BITS)
        if i % K_STEPS == K_STEPS - 1:
            rn = (pid * TILES + i // K_STEPS) * BLOCK_N + tl.arange(0, BLOCK_N)
            _epilogue(tl.sum(acc, axis=1)[None, :], tl.arange(0, 1), rn, 1, N, out_ptr, N, w_scale_ptr, w_scale_ptr,
                      bias_ptr, False, HAS_BIAS, ROUND)
            acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)


@triton.jit
def _dot_kernel(
    x_ptr, w_ptr, w_scale_ptr, x_scale_ptr, bias_ptr, out_ptr, part_ptr,
    M, N, K, stride_xm, stride_wn, stride_om, k_per_split, plane,
    HAS_X_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, ACC_DTYPE: tl.constexpr, CONVERT_W: tl.constexpr,
    W_INT8: tl.constexpr, DOT_IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr, ROUND: tl.constexpr,
):
    wait_for_inputs(PDL)
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    # grouped order: GROUP_M row tiles sweep the columns together, so weight tiles are reused in L2
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_size
    pid_n = (pid % width) // group_size
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # activation rows past M are masked: no traffic when a decode batch fills a fraction of the
    # 16-row tile; weight rows past N read row N-1 (an unmasked stream) and are never stored
    row_mask = (rm < M)[:, None]
    wn = tl.minimum(rn, N - 1)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    x_ptrs = x_ptr + rm[:, None].to(tl.int64) * stride_xm + (k_lo + rk)[None, :]
    w_ptrs = w_ptr + wn[None, :].to(tl.int64) * stride_wn + (k_lo + rk)[:, None]  # [BLOCK_K, BLOCK_N], K-major
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k in range(k_lo, k_hi, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptrs, mask=row_mask, other=0.0)
            b = tl.load(w_ptrs)
        else:
            kmask = (k + rk) < K
            a = tl.load(x_ptrs, mask=row_mask & kmask[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=kmask[:, None], other=0.0)
        if CONVERT_W:
            b = _dequant(b, a.dtype, W_INT8)
        if UPCAST:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        elif DOT_IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee", out_dtype=ACC_DTYPE)
        else:
            acc = tl.dot(a, b, acc, out_dtype=ACC_DTYPE)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    _finish(acc, rm, rn, M, N, pid_k, out_ptr, stride_om, w_scale_ptr, x_scale_ptr, bias_ptr, part_ptr,
            plane, HAS_X_SCALE, HAS_BIAS, SPLIT_K, ROUND)


# ---------------------------------------------------------------- launchers

def _dot_upcast(dtype: torch.dtype) -> bool:
    """Triton's CPU interpreter (3.9) multiplies bfloat16 dot operands as their raw 16-bit integers:
    there, multiply in float32 (exact for bf16 operands, as the tensor cores do)."""
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


@dataclass
class Prologue:
    """What a gemv does to its one input row first (`rms_norm_gemv`, `act_and_mul_gemv`). kind:
    RMS_NORM, ADD_RMS_NORM (x + residual, also stored to `summed`), or SILU_AND_MUL /
    GELU_AND_MUL / GELU_TANH_AND_MUL (the row holds (gate, up), twice the weight's K)."""

    kind: int
    weight: torch.Tensor | None = None  # the norm's [K]
    eps: float = 0.0
    residual: torch.Tensor | None = None  # [1, K], unit last stride
    summed: torch.Tensor | None = None  # [1, K], written
    copies: int = 0  # ADD_RMS_NORM: the row is the sum of this many float32 rows (`fused_mlp`), x2 the first
    index: torch.Tensor | None = None  # RMS_NORM: [1] int, x2's row of a table (the gathered row stored to summed)

    @property
    def gated(self) -> bool:
        return self.kind >= SILU_AND_MUL


@dataclass
class Rope:
    """What a gemv does with its outputs, a q/k/v projection of one token (`rope_gemv`): rotate
    the q and k heads at `position`, store k and v into the paged caches at `slot` (see
    `rope_epilogue.py`)."""

    style: int  # NEOX or GPTJ
    position: torch.Tensor  # [1] int
    cos_sin_cache: torch.Tensor  # [max_positions, head_dim] float32, (cos | sin)
    slot: torch.Tensor  # [1] int; negative: a padding token, no cache write
    k_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor  # [num_blocks, block_size, Hkv, DV]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    k_scale: float = 1.0
    v_scale: float = 1.0

    @property
    def fp8(self) -> bool:
        return self.k_cache.dtype == torch.float8_e4m3fn

    def args(self) -> tuple:
        kc, vc = self.k_cache.stride(), self.v_cache.stride()
        cs = self.cos_sin_cache
        return (self.position, cs, self.slot, self.k_cache, self.v_cache, cs.stride(0), kc[0], kc[1], kc[2], vc[0],
                vc[1], vc[2], self.k_cache.shape[1], float(self.k_scale), float(self.v_scale),
                self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.v_cache.shape[-1])


def _rope_config(cfg: GemmConfig, rope: Rope, x_scale: torch.Tensor | None) -> GemmConfig:
    """The tiling with a rope epilogue: the plain gemv (one tile a program: the tiles kernel's
    rotary form lost, codegen/NOTES.md, session 30), one split (the epilogue needs whole sums), and
    programs of whole pairs inside one head (BLOCK_N even, dividing head_dim)."""
    if cfg.kernel != "gemv" or x_scale is not None:
        raise ValueError(f"a rope epilogue needs the weight-only or float gemv, got {cfg}"
                         + (" with activation scales" if x_scale is not None else ""))
    block_n = cfg.block_n
    while block_n > 2 and rope.head_dim % block_n:
        block_n //= 2
    if block_n < 2 or rope.head_dim % block_n:
        raise ValueError(f"a rope epilogue needs an even head_dim, got {rope.head_dim}")
    return dataclasses.replace(cfg, block_n=block_n, split_k=1, tiles=1, depth=1)


def _no_rope_args(x: torch.Tensor) -> tuple:
    """The rope arguments of a gemv without the epilogue: placeholders it never reads."""
    return (x, x, x, x, x) + (0,) * 8 + (1.0, 1.0) + (0, 0, 1)


def _send_args(buffers: TwoRankAllReduce | None, x: torch.Tensor) -> tuple:
    """The arguments of a gemv that sends its row to the peer (`reduced_gemv`), or placeholders it never reads."""
    if buffers is None:
        return (0, x, 0)
    return (buffers.peer_recv.data_ptr(), buffers.epochs, buffers.recv.stride(0))


def _linear(x2: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, x_scale: torch.Tensor | None,
            bias: torch.Tensor | None, out_dtype: torch.dtype, config: GemmConfig | None,
            static_weight: bool = True, prologue: Prologue | None = None,
            round_to: torch.dtype | None = None, rope: Rope | None = None,
            send_to: TwoRankAllReduce | None = None) -> torch.Tensor:
    """x2 [M, K] (unit last stride) x wq [N, K] -> [M, N] in out_dtype, with the scales and bias
    (rounded to `round_to` first, when given).
    static_weight: wq lives outside any graph being captured (a parameter or load-time constant),
    not made by a kernel of the forward (see early_w below). prologue: what the gemv does to x2
    first (a gated one reads x2 [1, 2K]). send_to (a `TwoRankAllReduce`): each program also sends
    its values to the peer rank, and the output stays this rank's partial row; see `reduced_gemv`."""
    M, N, K = x2.shape[0], wq.shape[0], wq.shape[1]
    if x2.shape[1] != (2 * K if prologue is not None and prologue.gated else K):
        raise ValueError(f"input of shape {tuple(x2.shape)} for a weight of shape {tuple(wq.shape)}")
    out = torch.empty((M, N), dtype=out_dtype, device=x2.device)
    if M == 0 or N == 0:
        return out
    if K == 0:
        out.zero_()
        return out.add_(bias) if bias is not None else out
    # Loading weights before the PDL wait is safe only where no kernel can just have written them:
    # inside a captured forward (its kernels never write a parameter), for a weight that is one
    # (static_weight) and not a copy made here. (A weight a graph computes, as a cat of separate
    # ones, sits in the graph's memory pool, which other tensors reuse between replays.)
    early_w = (static_weight and wq.stride(-1) == 1 and torch.cuda.is_available()
               and torch.cuda.is_current_stream_capturing())
    if wq.stride(-1) != 1:
        wq = wq.contiguous()
    w_scale = w_scale.reshape(-1).float().contiguous()
    if x_scale is not None:
        x_scale = x_scale.reshape(-1).float().contiguous()
    if bias is not None:
        bias = bias.contiguous()
    cfg = config or pick_config(M, N, K, x2.dtype, _num_sms(x2.device), wq.dtype, rope is not None)
    if rope is not None:
        cfg = _rope_config(cfg, rope, x_scale)
    if cfg.kernel == "gemv" and M != 1:
        raise ValueError(f"the gemv kernel takes one row, got M={M} (config {cfg})")
    if prologue is not None and cfg.kernel != "gemv":
        raise ValueError(f"a prologue needs the gemv kernel, got {cfg}")
    if send_to is not None:
        if cfg.kernel != "gemv" or rope is not None or not send_to.takes_row(N, out_dtype, x2.device):
            raise ValueError(f"a summed row needs the gemv without a rope epilogue and a row the buffers take, got "
                             f"{cfg}, {N} {out_dtype} values on {x2.device}" + (" with rope" if rope else ""))
        cfg = dataclasses.replace(cfg, split_k=1, tiles=1, depth=1)
        if cfg.block_n % (4 // out.element_size()) or _ALL_REDUCE_BLOCK % cfg.block_n:
            raise ValueError(f"a gemv that sends its rows needs tiles of whole words in one chunk, got {cfg}")
    acc_int = x2.dtype == torch.int8 and wq.dtype == torch.int8
    block_k = cfg.block_k
    k_steps = triton.cdiv(K, block_k)
    split_k = min(cfg.split_k, k_steps)
    k_per_split = triton.cdiv(k_steps, split_k) * block_k
    split_k = triton.cdiv(K, k_per_split)  # no empty split
    if cfg.kernel == "gemv":
        grid_n = triton.cdiv(N, cfg.block_n)
        pro = prologue or Prologue(NO_PROLOGUE)  # (the gemvs' row arguments: the prologue's tensors or x2 in their place)
        row_args = tuple(t if t is not None else x2 for t in (
            pro.residual if pro.index is None else pro.index, pro.weight, pro.summed))
    else:
        tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    if split_k > 1:
        part = torch.empty((split_k, M, N), dtype=torch.int32 if acc_int else torch.float32, device=x2.device)
    else:
        part = out  # unused
    pdl = launch_args(x2.device)
    common = dict(HAS_X_SCALE=x_scale is not None, HAS_BIAS=bias is not None, W_INT8=wq.dtype == torch.int8,
                  SPLIT_K=split_k, EVEN_K=K % block_k == 0, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                  ROUND=TL_DTYPES[round_to] if round_to is not None else None, **pdl)
    x_scale_arg = x_scale if x_scale is not None else w_scale
    bias_arg = bias if bias is not None else w_scale
    # several tiles a program (`_gemv_tiles_kernel`) for float rows without a rotary epilogue (`_rope_config`
    # makes those one tile); 8-bit activations (W8A8) take the plain gemv
    # (rows given as partial sums or gathered from a table: the plain gemv's too)
    if (cfg.kernel == "gemv" and cfg.tiles > 1 and x_scale is None and not acc_int and not pro.copies
            and pro.index is None):
        _gemv_tiles_kernel[(triton.cdiv(N, cfg.block_n * cfg.tiles),)](
            x2, wq, w_scale, bias_arg, out, *row_args, N, K, wq.stride(0), pro.eps,
            HAS_BIAS=bias is not None, W_INT8=wq.dtype == torch.int8,
            FP8_BITS=FP8_BY_BITS and wq.dtype == torch.float8_e4m3fn, BLOCK_N=cfg.block_n, BLOCK_K=block_k,
            K_STEPS=k_steps, TILES=cfg.tiles, DEPTH=cfg.depth, EVEN_K=K % block_k == 0, EARLY_W=early_w and pdl["PDL"],
            PROLOGUE=pro.kind, ROUND=common["ROUND"], num_warps=cfg.num_warps, num_stages=1, **pdl,
        )
    elif cfg.kernel == "gemv":
        norm_at_end = NORM_AT_END and pro.kind in (RMS_NORM, ADD_RMS_NORM) and split_k == 1
        cap = {"maxnreg": _ROPE_AT_END_MAXNREG} if norm_at_end and rope is not None and cfg.num_warps == 8 else {}
        _gemv_kernel[(grid_n, split_k)](
            x2, wq, w_scale, x_scale_arg, bias_arg, out, part, *row_args,
            N, K, wq.stride(0), k_per_split, M * N, pro.eps, *(rope.args() if rope is not None else _no_rope_args(x2)),
            *_send_args(send_to, x2),
            ROPE=rope.style if rope is not None else NO_ROPE, KV_FP8=rope is not None and rope.fp8,
            EXACT_ROUND=rope is not None and rope.fp8 and os.environ.get("TRITON_INTERPRET", "0") == "1",
            HEAD_D=rope.head_dim if rope is not None else 2, SEND=send_to is not None, PER_WORD=4 // out.element_size(),
            ACC_INT=acc_int, BLOCK_N=cfg.block_n, BLOCK_K=block_k, EARLY_W=early_w and pdl["PDL"],
            PROLOGUE=pro.kind, K_CHUNKS=k_steps if pro.kind in (RMS_NORM, ADD_RMS_NORM) and not norm_at_end else 1,
            NORM_AT_END=norm_at_end, X_COPIES=pro.copies, X_INDEX=pro.index is not None, **cap,
            FP8_BITS=FP8_BY_BITS and wq.dtype == torch.float8_e4m3fn and not acc_int, **common,
        )
    else:
        _dot_kernel[(tiles, split_k)](
            x2, wq, w_scale, x_scale_arg, bias_arg, out, part, M, N, K, x2.stride(0), wq.stride(0),
            out.stride(0), k_per_split, M * N,
            ACC_DTYPE=tl.int32 if acc_int else tl.float32, CONVERT_W=x2.dtype != wq.dtype,
            DOT_IEEE=x2.dtype == torch.float32, UPCAST=_dot_upcast(x2.dtype), BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n, BLOCK_K=block_k, GROUP_M=cfg.group_m, **common,
        )
    if split_k > 1:
        block_m, block_n = min(16, triton.next_power_of_2(M)), 128
        _split_k_sum_kernel[(triton.cdiv(M, block_m), triton.cdiv(N, block_n))](
            part, out, w_scale, x_scale_arg, bias_arg, M, N, out.stride(0), M * N, HAS_X_SCALE=x_scale is not None,
            HAS_BIAS=bias is not None, SPLIT_K=split_k, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
            ROUND=common["ROUND"], **pdl,
        )
    return out


def weight_only_linear(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                       config: GemmConfig | None = None) -> torch.Tensor:
    """x [..., K] float32/float16/bfloat16, wq [N, K] int8 or fp8, w_scale [N] float32, bias [N] or
    None -> [..., N] in x's dtype: F.linear(x, wq * w_scale[:, None], bias)."""
    if x.dtype not in TL_DTYPES or wq.dtype not in _QUANT_WEIGHT_DTYPES:
        raise TypeError(f"weight_only_linear: x must be float32/float16/bfloat16 and wq int8/float8_e4m3fn, "
                        f"got {x.dtype} and {wq.dtype}")
    out = _linear(_rows(x), wq, w_scale, None, bias, x.dtype, config)
    return out.reshape(*x.shape[:-1], wq.shape[0])


_unit_scales: dict[tuple[torch.device, int], torch.Tensor] = {}


def _unit_scale(w: torch.Tensor) -> torch.Tensor:
    """A float weight's per-channel scale: ones, made once per (device, rows)."""
    key = (w.device, w.shape[0])
    if key not in _unit_scales:
        _unit_scales[key] = torch.ones(w.shape[0], dtype=torch.float32, device=w.device)
    return _unit_scales[key]


def float_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                 config: GemmConfig | None = None, static_weight: bool = True,
                 out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """F.linear(x, w, bias) for float weights (w in x's dtype) through the same Triton kernels, a
    scale of 1 per channel: the gemv at M == 1 against cuBLAS's (benchmarks/kernels.py --sweep
    --sweep-kinds bf16). The engine's default for one-row float linears on a GPU with PDL
    (`triton_ops.set_float_gemv`): there, chained to the other kernels, it beat cuBLAS.
    static_weight=False: w is made by the forward itself (see `_linear`). out_dtype (default x's):
    the product is rounded to x's dtype, then stored in it, as `F.linear(x, w).to(out_dtype)`
    gives without a second kernel."""
    if x.dtype not in TL_DTYPES or w.dtype != x.dtype:
        raise TypeError(f"float_linear: x and w must share a float dtype, got {x.dtype} and {w.dtype}")
    out_dtype = out_dtype or x.dtype
    out = _linear(_rows(x), w, _unit_scale(w), None, bias, out_dtype, config, static_weight,
                  round_to=x.dtype if out_dtype != x.dtype else None)
    return out.reshape(*x.shape[:-1], w.shape[0])


def _weight_scale(name: str, x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor | None) -> torch.Tensor:
    """The per-channel scale of a prologue gemv's weight: w in x's dtype (scale 1), or with
    w_scale an 8-bit one (weight-only)."""
    if w_scale is None and w.dtype != x.dtype:
        raise TypeError(f"{name}: a float w must have x's dtype {x.dtype}, got {w.dtype}")
    if w_scale is not None and w.dtype not in _QUANT_WEIGHT_DTYPES:
        raise TypeError(f"{name}: with w_scale, w must be int8 or float8_e4m3fn, got {w.dtype}")
    return _unit_scale(w) if w_scale is None else w_scale


def rms_norm_gemv(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                  w: torch.Tensor, bias: torch.Tensor | None = None, config: GemmConfig | None = None,
                  static_weight: bool = True, w_scale: torch.Tensor | None = None, partials: bool = False,
                  index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One row: (F.linear(rms_norm(s), w, bias), s or None), s = x + residual (or x without one),
    as `kiln::rms_norm_linear` / `add_rms_norm_linear` compute them, in one gemv launch that
    normalizes its input row itself. x, residual, norm_weight share one float dtype; w has it too,
    or is 8-bit with its per-channel w_scale [N] (weight-only). partials (with a residual): x is
    [C, K] float32 partial sums (`fused_mlp.mlp_gemv`'s), the row their sum rounded to the
    residual's dtype. index (without a residual): x is a contiguous table [V, K] and the row is x[index]
    (index [1] int, read on the device: an embedding's token id), returned as s: (F.linear(rms_norm(x[index]),
    w, bias), x[index]) as `kiln::embedding_rms_norm_linear` computes them."""
    return _norm_gemv("rms_norm_gemv", x, residual, norm_weight, eps, w, bias, config, static_weight, w_scale,
                      partials=partials, index=index)


def rope_gemv(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float, w: torch.Tensor,
              bias: torch.Tensor | None, rope: Rope, config: GemmConfig | None = None, static_weight: bool = True,
              w_scale: torch.Tensor | None = None, partials: bool = False,
              index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`rms_norm_gemv` whose output is a q/k/v projection of one token, [H*D | Hkv*D | Hkv*DV]:
    its q and k heads come out rotated and its k and v columns also go into the caches, as
    `kiln::rms_norm_linear_rope` / `add_rms_norm_linear_rope` compute them (`Rope` says how;
    `rope_epilogue.py`). One launch: the norm in its prologue, rotary and the cache write in its
    epilogue. Full rotary only (the cos/sin table as wide as a head). partials, index: as rms_norm_gemv's."""
    D, H, HKV = rope.head_dim, rope.num_heads, rope.num_kv_heads
    if rope.cos_sin_cache.shape[-1] != D or rope.style not in (NEOX, GPTJ):
        raise ValueError(f"rope_gemv: full rotary only (a cos/sin table {D} wide), NEOX or GPTJ; got a table "
                         f"{rope.cos_sin_cache.shape[-1]} wide, style {rope.style}")
    if w.shape[0] != (H + HKV) * D + HKV * rope.v_cache.shape[-1]:
        raise ValueError(f"rope_gemv: a weight of {w.shape[0]} rows for {H} q and {HKV} kv heads of {D}")
    rope = dataclasses.replace(rope, cos_sin_cache=rope.cos_sin_cache.contiguous())
    return _norm_gemv("rope_gemv", x, residual, norm_weight, eps, w, bias, config, static_weight, w_scale, rope,
                      partials=partials, index=index)


def _norm_gemv(name, x, residual, norm_weight, eps, w, bias, config, static_weight, w_scale, rope=None,
               partials=False, index=None):
    K, dtype = x.shape[-1], norm_weight.dtype
    copies = 0
    if index is not None:  # (see rms_norm_gemv) x2 is the table's first row, the kernel's base for x[index]
        if (residual is not None or partials or x.dim() != 2 or not x.is_contiguous() or index.numel() != 1
                or index.dtype not in (torch.int32, torch.int64)):
            raise ValueError(f"{name}: a row gathered by index needs a contiguous table [V, K], one int index and no "
                             f"residual or partials; got x {tuple(x.shape)}, index {index.dtype} {tuple(index.shape)}")
        x = x[:1]
    elif partials:  # (see rms_norm_gemv)
        if residual is None or x.dtype != torch.float32 or not x.is_contiguous():
            raise ValueError(f"{name}: partial rows must be contiguous float32 and come with a residual, got x of "
                             f"{x.dtype} {tuple(x.shape)}, strides {x.stride()}" + (" without one" if residual is None else ""))
        copies = x.numel() // K
        x = x.view(copies, K)[:1]
    elif x.numel() != K:
        raise ValueError(f"{name} takes one row, got x of shape {tuple(x.shape)}")
    if dtype not in TL_DTYPES or (not partials and x.dtype != dtype) or (residual is not None and residual.dtype != dtype):
        raise TypeError(f"{name}: x, residual and norm_weight must share a float dtype, got {x.dtype}, "
                        f"{None if residual is None else residual.dtype} and {dtype}")
    scale = _weight_scale(name, norm_weight, w, w_scale)
    summed = torch.empty(x.shape, dtype=dtype, device=x.device) if residual is not None or index is not None else None
    prologue = Prologue(ADD_RMS_NORM if residual is not None else RMS_NORM, norm_weight.contiguous(), float(eps),
                        _rows(residual) if residual is not None else None,
                        summed.view(1, K) if summed is not None else None, copies,
                        index.reshape(1) if index is not None else None)
    out = _linear(_rows(x), w, scale, None, bias, dtype, config, static_weight, prologue, rope=rope)
    return out.reshape(*x.shape[:-1], w.shape[0]), summed


def _gated_row(name: str, x: torch.Tensor, activation: str | None, optional: bool = False) -> Prologue | None:
    """The prologue of a gemv taking one float row x that `activation` gates (None, where
    `optional`: x as it is), after checking x and the activation's name."""
    if x.numel() != x.shape[-1]:
        raise ValueError(f"{name} takes one row, got x of shape {tuple(x.shape)}")
    if not (optional and activation is None) and activation not in ACTIVATIONS:
        raise ValueError(f"{name}: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if x.dtype not in TL_DTYPES:
        raise TypeError(f"{name}: x must be float32/float16/bfloat16, got {x.dtype}")
    return Prologue(SILU_AND_MUL + ACTIVATIONS[activation]) if activation is not None else None


def act_and_mul_gemv(x: torch.Tensor, activation: str, w: torch.Tensor, bias: torch.Tensor | None = None,
                     config: GemmConfig | None = None, static_weight: bool = True,
                     w_scale: torch.Tensor | None = None) -> torch.Tensor:
    """One row x [..., 2F] holding (gate, up): F.linear(act(gate) * up, w, bias), as
    `kiln::act_and_mul_linear` computes it, in one gemv launch that gates its input row itself.
    activation: "silu", "gelu" or "gelu_tanh"; w [N, F] in x's float dtype, or 8-bit with its
    per-channel w_scale [N] (weight-only)."""
    prologue = _gated_row("act_and_mul_gemv", x, activation)
    scale = _weight_scale("act_and_mul_gemv", x, w, w_scale)
    out = _linear(_rows(x), w, scale, None, bias, x.dtype, config, static_weight, prologue)
    return out.reshape(*x.shape[:-1], w.shape[0])


def reduced_gemv(x: torch.Tensor, w: torch.Tensor, buffers: TwoRankAllReduce, activation: str | None = None,
                 bias: torch.Tensor | None = None, w_scale: torch.Tensor | None = None, static_weight: bool = True,
                 max_spins: int = MAX_SPINS) -> torch.Tensor:
    """One row on each of two ranks: F.linear(x, w, bias), or with `activation` of act(gate) * up
    (x holding (gate, up), as `act_and_mul_gemv`), summed with the peer rank's, which calls this at
    the same point: a row-parallel linear and its all-reduce, as `kiln::linear_all_reduce` computes
    them, through `buffers` (a `TwoRankAllReduce` of the "ll" protocol). The gemv's programs each send
    their values to the peer as they store them (`ll_send`: tagged words, no fence, no count), and a
    receive-only all-reduce launch after it sums them with this rank's row: the values cross NVLink
    while the gemv's last programs run, instead of after the launch boundary. The same bits as the
    gemv and then the all-reduce kernel: each rank's row rounded to x's dtype, then the two summed in
    float32. w in x's float dtype, or 8-bit with its per-channel w_scale (weight-only).

    (Two other ways were timed on two H100s and removed: the gemv's last program exchanging the row
    after a count, 3.728 against 3.457 ms/token, since every program then paid a release fence; and
    each chunk's last program gathering the chunk's words, 3.691 against 3.465: codegen/NOTES.md,
    sessions 22-24.)"""
    prologue = _gated_row("reduced_gemv", x, activation, optional=True)
    scale = _weight_scale("reduced_gemv", x, w, w_scale)
    out = _linear(_rows(x), w, scale, None, bias, x.dtype, None, static_weight, prologue, send_to=buffers)
    out = two_rank_all_reduce(out, buffers, max_spins, send=False)
    return out.reshape(*x.shape[:-1], w.shape[0])


# At M <= 16 the Triton fp8 GEMM beat torch._scaled_mm on every Llama-1B shape (H200, M=1:
# 1.2-1.6x bf16 against 0.8-1.4x; benchmarks/RESULTS.md, quantized GEMMs); from M=4096 up
# _scaled_mm is the faster (1.5-1.7x bf16 against 1.3-1.7x).
_FEW_ROWS = 16


def scaled_linear_backend(xq: torch.Tensor, wq: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype,
                          capability: tuple[int, int] | None = None) -> str:
    """"scaled_mm" where torch._scaled_mm takes the call and has more than a few rows, else
    "triton". capability: the device's (major, minor), read from xq's device when None (a CPU
    tensor has none: "triton").

    torch._scaled_mm with row-wise scales needs fp8 (sm89+), K and N multiples of 16, 16-byte
    aligned operands, bf16 output (the only row-wise output every torch >= 2.5 accepts; fp16 and
    fp32 came later) and a bias of the output's dtype (float32 bias is refused)."""
    if xq.dtype != torch.float8_e4m3fn or wq.dtype != torch.float8_e4m3fn:
        return "triton"
    if capability is None:
        if xq.device.type != "cuda":
            return "triton"
        capability = torch.cuda.get_device_capability(xq.device)
    K, N = xq.shape[-1], wq.shape[0]
    if xq.numel() // max(K, 1) <= _FEW_ROWS:
        return "triton"
    fits = (capability >= (8, 9) and K % 16 == 0 and N % 16 == 0 and out_dtype == torch.bfloat16
            and (bias is None or bias.dtype == torch.bfloat16)
            and wq.is_contiguous() and wq.data_ptr() % 16 == 0
            and (not xq.is_contiguous() or xq.data_ptr() % 16 == 0))  # a strided xq is copied (aligned)
    return "scaled_mm" if fits else "triton"


def scaled_linear(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                  bias: torch.Tensor | None, out_dtype: torch.dtype, config: GemmConfig | None = None,
                  backend: str | None = None) -> torch.Tensor:
    """xq [..., K] and wq [N, K] both int8 or both fp8, x_scale [..., 1] and w_scale [N] float32,
    bias [N] or None -> (xq @ wq.T) * x_scale * w_scale (+ bias), [..., N] in out_dtype.
    backend: None (pick by `scaled_linear_backend`), "scaled_mm" or "triton"."""
    if xq.dtype != wq.dtype or wq.dtype not in _QUANT_WEIGHT_DTYPES:
        raise TypeError(f"scaled_linear: xq and wq must both be int8 or both float8_e4m3fn, got {xq.dtype} and "
                        f"{wq.dtype}")
    lead, N = xq.shape[:-1], wq.shape[0]
    x2 = _rows(xq)
    backend = backend or scaled_linear_backend(x2, wq, bias, out_dtype)
    if backend == "scaled_mm":
        out = torch._scaled_mm(x2.contiguous(), wq.t(), scale_a=x_scale.reshape(-1, 1).float().contiguous(),
                               scale_b=w_scale.reshape(1, -1).float().contiguous(), bias=bias, out_dtype=out_dtype)
    elif backend == "triton":
        out = _linear(x2, wq, w_scale, x_scale, bias, out_dtype, config)
    else:
        raise ValueError(f"scaled_linear: backend must be None, 'scaled_mm' or 'triton', got {backend!r}")
    return out.reshape(*lead, N)
