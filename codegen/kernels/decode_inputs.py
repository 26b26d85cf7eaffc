"""A decode graph's first kernel: the step's staged inputs into the buffers its forward reads.

A captured decode step (`runtime/cuda_graphs.py`, which owns the layout) gets its inputs in one
host-to-device copy, into one int64 staging buffer; `at` gives where each field starts in it:
ids, positions and seq_lens (one entry a row), src (one a row: an index into `last_tokens`, or
-1), the block tables' width (one entry), and the block tables ([b, width], packed). This kernel,
the graph's first node, unpacks rows [0, b):

- input_ids[i] = last_tokens[src[i]] where src[i] >= 0, else ids[i]: under async scheduling a row
  whose token the previous step sampled on the device takes it from that step's greedy output
  (which every decode graph's argmax writes into `last_tokens`), with no copy outside the graph;
- positions[i] = positions; seq_lens[i] = seq_lens as int32 (the attention kernels' type);
- block_tables[i, :width] = the packed tables' row i (width is the step's widest row, so the
  host-to-device copy moves b x width entries, not b x max_blocks).

Before it, a step ran five small copies around the replay (the fill, the block tables, then ids,
positions and seq_lens inside the graph), each a launch the device waits for between steps.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.codegen.kernels.pdl import launch_args, wait_for_inputs

_BLOCK = 128


@triton.jit
def _unpack_kernel(staging_ptr, last_tokens_ptr, ids_ptr, positions_ptr, seq_lens_ptr, tables_ptr, ids_at, positions_at,
                   seq_lens_at, src_at, width_at, tables_at, table_stride, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    src = tl.load(staging_ptr + src_at + row)
    token = tl.load(last_tokens_ptr + tl.maximum(src, 0))  # (element 0 always exists)
    tl.store(ids_ptr + row, tl.where(src >= 0, token, tl.load(staging_ptr + ids_at + row)))
    tl.store(positions_ptr + row, tl.load(staging_ptr + positions_at + row))
    tl.store(seq_lens_ptr + row, tl.load(staging_ptr + seq_lens_at + row).to(tl.int32))
    width = tl.load(staging_ptr + width_at)
    packed = staging_ptr + tables_at + row * width
    for c in range(0, width, BLOCK):
        cols = c + tl.arange(0, BLOCK)
        mask = cols < width
        tl.store(tables_ptr + row * table_stride + cols, tl.load(packed + cols, mask=mask), mask=mask)


def unpack_decode_inputs(staging: torch.Tensor, at: tuple[int, ...], b: int, last_tokens: torch.Tensor,
                         input_ids: torch.Tensor, positions: torch.Tensor, seq_lens: torch.Tensor,
                         block_tables: torch.Tensor) -> None:
    """Rows [0, b) of the staged step into input_ids, positions (int64), seq_lens (int32) and
    block_tables [>= b, max_blocks] (int64). at: where ids, positions, seq_lens, src, the width and
    the packed tables start in `staging`."""
    if b == 0:
        return
    assert staging.dtype == last_tokens.dtype == input_ids.dtype == positions.dtype == block_tables.dtype == torch.int64
    assert seq_lens.dtype == torch.int32 and block_tables.stride(-1) == 1 and len(at) == 6
    _unpack_kernel[(b,)](staging, last_tokens, input_ids, positions, seq_lens, block_tables, *at,
                         block_tables.stride(0), BLOCK=_BLOCK, num_warps=1, **launch_args(staging.device))
