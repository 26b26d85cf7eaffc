"""CUDA graphs of the decode step, one per batch-size bucket (1, 2, 4, 8, 16, 32, ... up to
max_num_seqs). Each is captured once, with static input buffers; a decode step of B sequences pads
to the next bucket, fills the buffers and replays, so the step costs its kernels and nothing else.

With `logits` given (the runner's logits function), each graph also computes the step's logits
and their greedy argmax after the forward, so a plain decode step asks the host for one replay
instead of a replay, the logits call (a Dynamo-guarded compiled function around a custom op:
about 0.28 ms of host time a step on an H100 host) and the argmax's launches. The sampler takes the
captured argmax for rows it does not edit (`Sampler.tokens`).

Padding rows compute garbage that nobody reads: they write their key and value into a scratch
block the block manager never hands out, and attend over it alone (length 1).

Under tensor parallelism every rank captures the same buckets in the same order, its all_reduces
(NCCL) recorded in its graphs, and the vocabulary-parallel logits' all_gather too; rank 0 sends
each replayed step's inputs to the workers, which replay theirs (runtime/tensor_parallel.py). Such
graphs hold NCCL's communicator: they must go before the process group does.

`emulate=True` (`compilation_config={"cudagraph": "emulate"}`) builds the same object on any
device without CUDA graphs: each "replay" runs what a capture records, eagerly, into the same
static buffers (`EmulatedGraph`). It is how the engine's graph path (staging, padding, the
captured logits and argmax, async scheduling's fill, the tensor-parallel step protocol) is tested
on a CPU.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import torch

from kiln.ir import AttentionMetadata, ForwardContext, set_forward_context
from kiln.runtime.model_runner import fill_in, wait_for_readback
from kiln.runtime.sampler import greedy_tokens

logger = logging.getLogger(__name__)

# The staging buffer: FIELDS entries a row (ids, positions, slots, seq_lens, cross slots, src), META
# entries (the block tables' width, the token buffer the replay's argmax writes, then room), then
# the step's block tables packed [b, width].
FIELDS, META = 6, 8

# How many buffers the graphs' argmax writes in turn (`DecodeGraphs.token_buffers`). With one, each
# replay waits before it starts for the copy to the host of the last replay's tokens, since its
# argmax rewrites them; with two, replay k writes buffer k % 2, and waits only for the copy of
# replay k - 2's tokens, long done. Two took the device's idle time between batch-1 steps from 11.3
# to 4.4 us on an H100 (session 28; KILN_TOKEN_BUFFERS=1 is the form before; read when a
# DecodeGraphs is made).
TOKEN_BUFFERS = int(os.environ.get("KILN_TOKEN_BUFFERS", "2"))

# Whether each graph's first kernel unpacks the staged step (True), or five copies around the
# replay do (False: the form before session 25, kept until the GPU times both; KILN_UNPACK_IN_GRAPH=0).
# Read when a DecodeGraphs is made.
UNPACK_IN_GRAPH = os.environ.get("KILN_UNPACK_IN_GRAPH", "1") != "0"


def unpack_reference(staging: torch.Tensor, at: tuple[int, ...], b: int, last_tokens: torch.Tensor,
                     input_ids: torch.Tensor, positions: torch.Tensor, seq_lens: torch.Tensor,
                     block_tables: torch.Tensor) -> None:
    """`codegen/kernels/decode_inputs.unpack_decode_inputs` in torch ops: a graph's first op off
    CUDA (and the kernel's test reference)."""
    ids_at, positions_at, seq_lens_at, src_at, width_at, tables_at = at
    src = staging[src_at:src_at + b]
    input_ids[:b] = torch.where(src >= 0, last_tokens[src.clamp(min=0)], staging[ids_at:ids_at + b])
    positions[:b] = staging[positions_at:positions_at + b]
    seq_lens[:b] = staging[seq_lens_at:seq_lens_at + b].to(torch.int32)
    width = int(staging[width_at])
    block_tables[:b, :width] = staging[tables_at:tables_at + b * width].view(b, width)


def bucket_sizes(max_num_seqs: int) -> list[int]:
    sizes, b = [], 1
    while b < max_num_seqs:
        sizes.append(b)
        b *= 2
    return sizes + [max_num_seqs]


class DecodeGraphs:
    def __init__(self, forward: Callable, kv_caches, block_size: int, max_blocks_per_seq: int, scratch_block: int,
                 max_num_seqs: int, device: torch.device, cross_kv_caches=None, kv_scales=None,
                 logits: Callable | None = None, emulate: bool = False):
        self.forward, self.kv_caches, self.block_size = forward, kv_caches, block_size
        self.emulate = emulate
        self.logits = logits  # hidden [B, H] -> logits [B, V] float32, captured after the forward when given
        self.kv_scales = kv_scales  # an fp8 cache's per-layer (k_scale, v_scale): plain floats, baked into the graphs
        self.cross_kv_caches = cross_kv_caches  # encoder-decoder models: each row reads its cross-cache slot
        self.sizes = bucket_sizes(max_num_seqs)
        # one row more than the largest bucket: a graph's inputs are then always strict slices of
        # the buffers, so torch.compile sees the same kind of view for every size (no recompiles)
        n = self.sizes[-1] + 1
        self.rows, self.max_blocks = n, max_blocks_per_seq
        self.scratch_slot = scratch_block * block_size
        # A step's inputs reach the device in one copy from pinned memory, into one int64 buffer
        # that the staged inputs are views of: [ids | positions | slots | seq_lens | cross slots |
        # src | the widest table row, 7 unused | the step's block tables, [rows, widest row]
        # packed]. Each graph's first kernel (`unpack`) then fills the forward's own inputs from it:
        # the ids (row i takes last_tokens[src[i]], the previous replay's argmax, where src[i] >= 0:
        # async scheduling's tokens, sampled on the device), positions, int32 seq_lens, and the
        # packed tables into the graphs' [n, max_blocks] table. (A copy from pageable memory would
        # make the host wait for the queued work, the step in flight included, undoing async
        # scheduling's overlap; copying whole max_blocks-wide rows would move megabytes at long
        # max_model_len.)
        # Created in inference mode, like the tensors of the eager steps: a normal tensor carries a
        # dispatch key (ADInplaceOrView) that inference tensors lack, so graph inputs made outside
        # inference mode fail the guards of the graph the capture compiled, and torch.compile
        # traced the model a second time for the first prompt (10 s of a warm start on an H100).
        self.unpack_in_graph = UNPACK_IN_GRAPH
        self.tables_start = FIELDS * n + META
        # where `unpack` reads ids, positions, seq_lens, src, the tables' width and the tables
        self.layout = (0, n, 3 * n, 5 * n, FIELDS * n, self.tables_start)
        with torch.inference_mode():
            self.staging = torch.zeros(self.tables_start + n * max_blocks_per_seq, dtype=torch.long, device=device)
            self.staged_ids, self.staged_positions, self.slot_mapping, seq_lens, self.cross_slots, self.staged_src = \
                self.staging[:FIELDS * n].view(FIELDS, n)
            self.staged_src.fill_(-1)
            # The forward's own inputs are separate tensors, filled from the staged ones inside each
            # graph: views at an offset into one buffer would not match the prefill's fresh tensors
            # either (a guard on positions.storage_offset()).
            self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
            self.positions = torch.zeros(n, dtype=torch.long, device=device)
            self.block_tables = torch.full((n, max_blocks_per_seq), scratch_block, dtype=torch.long, device=device)
            self.slot_mapping.fill_(self.scratch_slot)
            seq_lens.fill_(1)
            self.seq_lens_long = seq_lens
            self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)  # (the kernels' dtype: converted in the graph)
            # every graph's greedy argmax, written into row (replay number % TOKEN_BUFFERS), which
            # the staging names (at `token_buffer_at`): the next step's `src` rows read it, by an index into
            # the flattened buffers
            self.token_buffers = torch.zeros((TOKEN_BUFFERS, n), dtype=torch.long, device=device)
            self.token_buffer_at = FIELDS * n + 1
            self.staged_token_buffer = self.staging[self.token_buffer_at:self.token_buffer_at + 1]
            self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
            # two pinned host buffers, alternating: the host fills one while the other's copy may still be queued
            pinned = device.type == "cuda"
            self.host = [torch.zeros_like(self.staging, device="cpu").pin_memory() if pinned
                         else torch.zeros_like(self.staging, device="cpu") for _ in range(2)]
        self.host_arrays = [h.numpy() for h in self.host]
        self.copied = [torch.cuda.Event() if pinned else None for _ in range(2)]
        self.turn = 0
        self.replays = 0  # (replay k's argmax writes token_buffers[k % TOKEN_BUFFERS])
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.captured_logits: dict[int, torch.Tensor] = {}  # bucket -> its logits (the argmax: token_buffers)
        # the last replay's (hidden, logits, argmax), as run() returned them
        self._last: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
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
        if self.emulate:
            for b in reversed(self.sizes):
                self.graphs[b] = EmulatedGraph(self, b)
                self.graphs[b].record()
            return
        for b in reversed(self.sizes):  # largest first: the smaller graphs reuse its memory pool
            start = time.perf_counter()
            with set_forward_context(self._context(b)):
                for _ in range(2):  # warm up: compile for this size, let the allocator settle
                    hidden = self.forward(self.input_ids[:b], self.positions[:b])
                    if self.logits is not None:
                        greedy_tokens(self.logits(hidden))
                torch.cuda.synchronize()
                warmed = time.perf_counter()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    if self.unpack_in_graph:
                        self.unpack(b)
                    else:  # (the tables were copied in before the replay)
                        self.input_ids[:b].copy_(self.staged_ids[:b])
                        self.positions[:b].copy_(self.staged_positions[:b])
                        self.seq_lens[:b].copy_(self.seq_lens_long[:b])
                    self.outputs[b] = self.forward(self.input_ids[:b], self.positions[:b])
                    if self.logits is not None:
                        self.captured_logits[b] = self.logits(self.outputs[b])
                        self.argmax(b)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[b] = graph
            logger.debug("kiln: decode graph for %d rows: warm-up runs %.2f s, capture %.2f s", b, warmed - start,
                         time.perf_counter() - warmed)

    def fits(self, batch: int) -> bool:
        return batch <= self.sizes[-1]

    def argmax(self, b: int) -> None:
        """A graph's last op: the greedy tokens of bucket b's logits into the token buffer the
        staging names."""
        greedy_tokens(self.captured_logits[b], out=self.token_buffers[:, :b], out_row=self.staged_token_buffer)

    def _buffer(self, replay: int) -> int:
        """The token buffer that replay number `replay` (from 0) writes its argmax into."""
        return replay % len(self.token_buffers)

    @property
    def last_tokens(self) -> torch.Tensor:
        """The buffer the last replay's argmax wrote (all rows: a replay of b rows wrote [:b])."""
        return self.token_buffers[self._buffer(self.replays - 1)]

    def unpack(self, b: int) -> None:
        """A graph's first op: rows [0, b) of the staged step into the forward's inputs (the Triton
        kernel on CUDA, torch ops elsewhere; `codegen/kernels/decode_inputs.py`)."""
        unpack = unpack_reference
        if self.staging.is_cuda:
            from kiln.codegen.kernels.decode_inputs import unpack_decode_inputs as unpack
        unpack(self.staging, self.layout, b, self.token_buffers.view(-1), self.input_ids, self.positions,
               self.seq_lens, self.block_tables)

    def takes_own(self, tokens: torch.Tensor) -> bool:
        """Whether `tokens` are the last replay's argmax, in place (`last_tokens`): a step can then
        read them inside its graph, by index, instead of a copy before it."""
        return (self.unpack_in_graph and tokens.device == self.last_tokens.device and tokens.dtype == torch.long
                and tokens.dim() == 1 and tokens.is_contiguous() and tokens.data_ptr() == self.last_tokens.data_ptr())

    @torch.inference_mode()
    def run(self, input_ids: list[int], positions: list[int], slots: list[int], block_tables: list[list[int]],
            seq_lens: list[int], cross_slots: list[int] | None = None, fill=None) -> torch.Tensor:
        """One decode step of len(input_ids) sequences -> hidden states [B, hidden]. `fill`:
        (tokens, rows, src) of async scheduling, input_ids[rows] = tokens[src] on the device: read
        inside the graph when `tokens` are the last replay's argmax (`takes_own`), else copied into
        the staged ids before it."""
        b = len(input_ids)
        padded = next(s for s in self.sizes if s >= b)
        own = fill is not None and self.takes_own(fill[0])
        if own:  # (the staged src indexes the flattened buffers, the last replay's among them)
            start = self._buffer(self.replays - 1) * self.rows
            fill = (fill[0], fill[1], [start + i for i in fill[2]])
        tokens = self.token_buffers[self._buffer(self.replays)]  # (the buffer this replay's argmax writes)
        self.stage(input_ids, positions, slots, block_tables, seq_lens, cross_slots, padded,
                   src=fill[1:] if own else None)
        if fill is not None and not own:
            fill_in(self.staged_ids, *fill)
        if self.staging.is_cuda:
            wait_for_readback(tokens)  # (the copy of what that buffer held, before the argmax rewrites it)
        self.graphs[padded].replay()
        self.replays += 1
        hidden = self.outputs[padded][:b]
        if padded in self.captured_logits:
            self._last = (hidden, self.captured_logits[padded][:b], tokens[:b])
        return hidden

    def logits_of(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """The logits [B, V] the last replay computed, when `hidden` is the hidden states it
        returned (the same tensor object); else None."""
        last = self._last
        return last[1] if last is not None and last[0] is hidden else None

    def greedy_of(self, logits: torch.Tensor) -> torch.Tensor | None:
        """The greedy tokens [B] the last replay computed, when `logits` are its logits (the same
        tensor object, from `logits_of`); else None."""
        last = self._last
        return last[2] if last is not None and last[1] is logits else None

    def stage(self, input_ids: list[int], positions: list[int], slots: list[int], block_tables: list[list[int]],
              seq_lens: list[int], cross_slots: list[int] | None, padded: int, src=None) -> None:
        """Write the step's inputs, padded to `padded` rows, into a pinned host buffer and queue its
        copy into the staging buffer, which the graph's first kernel unpacks. `src`: (rows,
        indices), rows whose id is last_tokens[index]. (Under run()'s inference mode: the buffers
        are inference tensors.)"""
        n, b, turn = self.rows, len(input_ids), self.turn
        self.turn ^= 1
        if self.copied[turn] is not None:
            self.copied[turn].synchronize()  # (its last copy, two steps ago: long done)
        host, array = self.host[turn], self.host_arrays[turn]
        heads = array[:FIELDS * n].reshape(FIELDS, n)
        heads[0, :b], heads[0, b:padded] = input_ids, 0
        heads[1, :b], heads[1, b:padded] = positions, 0
        heads[2, :b], heads[2, b:padded] = slots, self.scratch_slot
        heads[3, :b], heads[3, b:padded] = seq_lens, 1
        heads[4, :b], heads[4, b:padded] = cross_slots if cross_slots is not None else 0, 0
        heads[5, :padded] = -1
        if src is not None:
            heads[5, src[0]] = src[1]
        width = max(len(t) for t in block_tables)
        array[FIELDS * n] = width
        array[self.token_buffer_at] = self._buffer(self.replays)  # (the token buffer its argmax writes)
        end = self.tables_start + padded * width
        tables = array[self.tables_start:end].reshape(padded, width)
        for i, t in enumerate(block_tables):  # (columns past a row's length are never read)
            tables[i, :len(t)] = t
        tables[b:, 0] = self.scratch_slot // self.block_size
        # rows past `padded`, and a row's columns past its length, keep stale values nobody reads
        self.staging[:end].copy_(host[:end], non_blocking=True)
        if self.copied[turn] is not None:
            self.copied[turn].record()
        if not self.unpack_in_graph:
            self.block_tables[:padded, :width].copy_(self.staging[self.tables_start:end].view(padded, width))


class EmulatedGraph:
    """A decode graph's stand-in without CUDA graphs (`DecodeGraphs(emulate=True)`): `replay`
    runs what the capture records (the input copies, the forward, the logits and their argmax)
    eagerly, into the graphs' static outputs. Its forward context carries the lengths as lists
    too, rebuilt from the staged buffers, since the reference ops read those (the Triton kernels
    read the tensors)."""

    def __init__(self, graphs: DecodeGraphs, b: int):
        self.graphs, self.b = graphs, b
        self.replays = 0

    def record(self) -> None:
        """The capture's counterpart: one run makes the static outputs (and compiles, as a capture's
        warm-up would)."""
        g, b = self.graphs, self.b
        with set_forward_context(g._context(b)):
            g.outputs[b] = g.forward(g.input_ids[:b], g.positions[:b]).clone()
            if g.logits is not None:
                g.captured_logits[b] = g.logits(g.outputs[b]).clone()
                g.argmax(b)

    @torch.inference_mode()
    def replay(self) -> None:
        g, b = self.graphs, self.b
        self.replays += 1
        g.unpack(b)
        context = g._context(b)
        context.attn.seq_lens = g.seq_lens_long[:b].tolist()
        with set_forward_context(context):
            hidden = g.forward(g.input_ids[:b], g.positions[:b])
            g.outputs[b].copy_(hidden)
            if g.logits is not None:
                g.captured_logits[b].copy_(g.logits(g.outputs[b]))
                g.argmax(b)
