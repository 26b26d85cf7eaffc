"""Pieces the decode and prefill attention kernels share: paged key/value loads and score capping.

Scores are kept in the log2 domain (scaled by log2(e)) so the softmax uses exp2.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def load_paged(
    cache_ptr, table_row_ptr, pos, mask, head, stride_b, stride_s, stride_h, d, d_mask, block_size,
):
    """Rows of one kv head at token positions pos [N] of a sequence whose blocks are listed at
    table_row_ptr, from a cache [num_blocks, block_size, Hkv, D] -> [N, BLOCK_D] (0 where masked)."""
    blk = tl.load(table_row_ptr + pos // block_size, mask=mask, other=0).to(tl.int64)
    off = (pos % block_size).to(tl.int64)
    ptrs = cache_ptr + blk[:, None] * stride_b + off[:, None] * stride_s + head * stride_h + d[None, :]
    return tl.load(ptrs, mask=mask[:, None] & d_mask[None, :], other=0.0)


@triton.jit
def load_paged_row(cache_ptr, table_row_ptr, pos, lo, hi, head, stride_b, stride_s, stride_h, d, d_mask, block_size):
    """`load_paged` of one position pos (a scalar) -> [BLOCK_D], 0 unless lo <= pos < hi. The table
    is read at pos // block_size even then, clamped at 0: it has that entry."""
    pos = tl.maximum(pos, 0)
    blk = tl.load(table_row_ptr + pos // block_size).to(tl.int64)
    off = (pos % block_size).to(tl.int64)
    at = d * 0 + pos  # (as a vector: Triton 3.9's interpreter cannot mask with tensor & scalar)
    return tl.load(cache_ptr + blk * stride_b + off * stride_s + head * stride_h + d,
                   mask=d_mask & (at >= lo) & (at < hi), other=0.0)


@triton.jit
def log2_scores(qk, scale, soft_cap, HAS_SOFT_CAP: tl.constexpr):
    """Raw q.k products (float32) -> scaled, optionally capped (cap * tanh(s / cap)) scores in log2 units."""
    s = qk * scale
    if HAS_SOFT_CAP:
        # tanh(x) = 1 - 2 / (exp(2x) + 1): exact at both ends (exp overflow gives 1, underflow -1).
        x = s / soft_cap
        s = soft_cap * (1.0 - 2.0 / (tl.exp2(x * (2.0 * 1.4426950408889634)) + 1.0))
    return s * 1.4426950408889634


@triton.jit
def mma(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot with float32 accumulation. UPCAST: multiply in float32 instead, for Triton's CPU
    interpreter, whose dot multiplies bfloat16 operands as their raw 16-bit integers (triton 3.9).
    A bf16 x bf16 product is exact in float32, so the upcast computes what the tensor cores do."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


def dot_upcast(dtype: torch.dtype) -> bool:
    """Whether `mma` must upcast: bfloat16 operands under TRITON_INTERPRET=1."""
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_precision(dtype: torch.dtype) -> str:
    """float32 dots in full precision (Triton would use tf32); other dtypes as the hardware does."""
    return "ieee" if dtype == torch.float32 else "tf32"


def check_cache(name: str, cache: torch.Tensor) -> None:
    if cache.dim() != 4 or cache.stride(-1) != 1:
        raise ValueError(f"{name} must be [num_blocks, block_size, Hkv, D] with a unit last stride, got "
                         f"shape {tuple(cache.shape)} strides {cache.stride()}")


def block_dim(n: int) -> int:
    """A power-of-two tile edge covering n, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(n))
