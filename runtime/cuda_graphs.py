"""CUDA graphs of the decode step, one per batch-size bucket (1, 2, 4, 8, 16, 32, ... up to
max_num_seqs). Each is captured once, with static input buffers; a decode step of B sequences pads
to the next bucket, fills the buffers and replays, so the step costs its kernels and nothing else.

Padding rows compute garbage that nobody reads: they write their key and value into a scratch
block the block manager never hands out, and attend over it alone (length 1).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from kiln.ir import AttentionMetadata, ForwardContext, set_forward_context


def bucket_sizes(max_num_seqs: int) -> list[int]:
    sizes, b = [], 1
    while b < max_num_seqs:
        sizes.append(b)
        b *= 2
    return sizes + [max_num_seqs]


class DecodeGraphs:
    def __init__(self, forward: Callable, kv_caches, block_size: int, max_blocks_per_seq: int, scratch_block: int,
                 max_num_seqs: int, device: torch.device, cross_kv_caches=None, kv_scales=None):
        self.forward, self.kv_caches, self.block_size = forward, kv_caches, block_size
        self.kv_scales = kv_scales  # an fp8 cache's per-layer (k_scale, v_scale): plain floats, baked into the graphs
        self.cross_kv_caches = cross_kv_caches  # encoder-decoder models: each row reads its cross-cache slot
        self.sizes = bucket_sizes(max_num_seqs)
        # one row more than the largest bucket: a graph's inputs are then always strict slices of
        # the buffers, so torch.compile sees the same kind of view for every size (no recompiles)
        n = self.sizes[-1] + 1
        self.scratch_slot = scratch_block * block_size
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), self.scratch_slot, dtype=torch.long, device=device)
        self.block_tables = torch.full((n, max_blocks_per_seq), scratch_block, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.cross_slots = torch.zeros(n, dtype=torch.long, device=device)  # padding rows read slot 0, harmlessly
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None

    def _context(self, b: int) -> ForwardContext:
        md = AttentionMetadata(slot_mapping=self.slot_mapping[:b], block_tables=self.block_tables[:b],
                               query_lens=[1] * b, seq_lens=[1] * b, block_size=self.block_size,
                               cross_slots=[0] * b if self.cross_kv_caches is not None else None)
        md.query_start_loc, md.seq_lens_tensor = self.query_start_loc[:b + 1], self.seq_lens[:b]
        md.cross_slots_tensor = self.cross_slots[:b]
        return ForwardContext(md, self.kv_caches, self.cross_kv_caches, self.kv_scales)

    @torch.inference_mode()
    def capture(self) -> None:
        for b in reversed(self.sizes):  # largest first: the smaller graphs reuse its memory pool
            with set_forward_context(self._context(b)):
                for _ in range(2):  # warm up: compile for this size, let the allocator settle
                    self.forward(self.input_ids[:b], self.positions[:b])
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    self.outputs[b] = self.forward(self.input_ids[:b], self.positions[:b])
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[b] = graph

    def fits(self, batch: int) -> bool:
        return batch <= self.sizes[-1]

    @torch.inference_mode()
    def run(self, input_ids: list[int], positions: list[int], slots: list[int], block_tables: list[list[int]],
            seq_lens: list[int], cross_slots: list[int] | None = None, fill=None) -> torch.Tensor:
        """One decode step of len(input_ids) sequences -> hidden states [B, hidden]. `fill`:
        (tokens, rows, src) of async scheduling, input_ids[rows] = tokens[src] on the device."""
        b = len(input_ids)
        padded = next(s for s in self.sizes if s >= b)
        pad = padded - b
        self.input_ids[:padded].copy_(torch.tensor(input_ids + [0] * pad), non_blocking=True)
        self.positions[:padded].copy_(torch.tensor(positions + [0] * pad), non_blocking=True)
        self.slot_mapping[:padded].copy_(torch.tensor(slots + [self.scratch_slot] * pad), non_blocking=True)
        self.seq_lens[:padded].copy_(torch.tensor(seq_lens + [1] * pad, dtype=torch.int32), non_blocking=True)
        width = max(len(t) for t in block_tables)
        rows = np.full((padded, width), self.scratch_slot // self.block_size, dtype=np.int64)
        for i, t in enumerate(block_tables):  # (numpy: a row from a list costs a tenth of torch.tensor's)
            rows[i, :len(t)] = t
        self.block_tables[:padded, :width].copy_(torch.from_numpy(rows), non_blocking=True)
        if cross_slots is not None:
            self.cross_slots[:padded].copy_(torch.tensor(cross_slots + [0] * pad), non_blocking=True)
        if fill is not None:
            from kiln.runtime.model_runner import fill_in

            fill_in(self.input_ids, *fill)
        self.graphs[padded].replay()
        return self.outputs[padded][:b]
