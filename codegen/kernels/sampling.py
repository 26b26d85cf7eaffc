"""Greedy sampling's argmax over a vocabulary row, in two launches.

torch's argmax reduces a row with one thread block: over a 128K vocabulary at batch 1 that is
about 28 us on an H100, 2% of a Llama-1B decode step. Here the first launch splits each row into
chunks of BLOCK (one program each: its maximum and the first index holding it), the second
reduces a row's chunks. Same result as `torch.argmax(x, -1)`: the first index of the maximum
(so ties go to the lowest index; a row of -inf gives 0), int64. NaN counts as larger than any
number, as in torch; a row with several NaNs gives the first, and one with NaN and +inf its
first of either (torch: the first NaN).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.codegen.kernels.pdl import launch_args, wait_for_inputs

_BLOCK = 2048


@triton.jit
def _chunk_max_kernel(x_ptr, val_ptr, idx_ptr, V, stride_row, num_chunks, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * stride_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
    x = tl.where(x != x, float("inf"), x)  # NaN wins
    m = tl.max(x, axis=0)
    # (a masked column holds -inf: it can tie only with a chunk of -inf, whose first column is real)
    first = tl.min(tl.where(x == m, cols, V), axis=0)
    tl.store(val_ptr + row * num_chunks + chunk, m)
    tl.store(idx_ptr + row * num_chunks + chunk, first)


@triton.jit
def _chunks_argmax_kernel(val_ptr, idx_ptr, out_ptr, out_row_ptr, out_stride, num_chunks, V, BLOCK: tl.constexpr,
                          OUT_ROW: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    if OUT_ROW:  # (the row of `out` this launch writes, read on the device: a CUDA graph replays it)
        out_ptr += tl.load(out_row_ptr) * out_stride
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    mask = c < num_chunks
    v = tl.load(val_ptr + row * num_chunks + c, mask=mask, other=float("-inf"))
    i = tl.load(idx_ptr + row * num_chunks + c, mask=mask, other=V)
    m = tl.max(v, axis=0)
    best = tl.min(tl.where(mask & (v == m), i, V), axis=0)
    tl.store(out_ptr + row, best.to(tl.int64))


def argmax(x: torch.Tensor, out: torch.Tensor | None = None, out_row: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, V] float -> [B] int64, torch.argmax(x, -1); into `out` ([B] int64, contiguous) when
    given. With `out_row` (a one-element int64 tensor on the device), `out` is [R, B] (rows
    contiguous) and the result goes into out[out_row], a row chosen when the kernel runs."""
    B, V = x.shape
    if out is None:
        out = torch.empty(B, dtype=torch.int64, device=x.device)
    rows = out if out_row is not None else out[None]
    assert rows.shape[1:] == (B,) and out.dtype == torch.int64 and (B == 0 or rows.stride(1) == 1)
    assert out_row is None or (out_row.numel() == 1 and out_row.dtype == torch.int64)
    if B == 0:
        return out
    if V == 0:
        raise ValueError("argmax of an empty row")
    x = x if x.stride(-1) == 1 else x.contiguous()
    num_chunks = triton.cdiv(V, _BLOCK)
    vals = torch.empty((B, num_chunks), dtype=torch.float32, device=x.device)
    idx = torch.empty((B, num_chunks), dtype=torch.int32, device=x.device)
    pdl = launch_args(x.device)
    _chunk_max_kernel[(B, num_chunks)](x, vals, idx, V, x.stride(0), num_chunks, BLOCK=_BLOCK, num_warps=4, **pdl)
    _chunks_argmax_kernel[(B,)](vals, idx, rows, out_row if out_row is not None else rows, rows.stride(0),
                                num_chunks, V, BLOCK=triton.next_power_of_2(num_chunks),
                                OUT_ROW=out_row is not None, num_warps=4, **pdl)
    return out
