"""The model runner: owns the model and its KV cache, turns a scheduled step into one flattened
forward pass (no padding between sequences), and returns the hidden states the engine needs."""

from __future__ import annotations

import functools
import itertools
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from kiln.ir import AttentionMetadata, ForwardContext, set_forward_context
from kiln.runtime.pooler import PoolingBatch
from kiln.runtime.request import Request
from kiln.runtime.scheduler import SchedulerOutput


# Whether a step's sampled tokens go back to the host on a CUDA stream of their own (True): on the
# main stream the copy stood between two decode steps, the next step's input copy queued behind it.
# KILN_READBACK_STREAM=0 copies on the main stream (the form before session 25, kept until timed).
READBACK_STREAM = os.environ.get("KILN_READBACK_STREAM", "1") != "0"
_readback_streams: dict[torch.device, "torch.cuda.Stream"] = {}
# per device tensor read back (its data pointer): the event after its copy, which a decode graph's
# replay waits for before its argmax rewrites that buffer (`DecodeGraphs.token_buffers`). An entry
# goes when the host has waited for its copy (`PendingTokens.token_ids`), so it holds the tokens of
# at most the steps in flight.
_readbacks: dict[int, "torch.cuda.Event"] = {}


def wait_for_readback(tokens: torch.Tensor) -> None:
    """Make the current stream wait for the last copy to the host of `tokens` (a buffer), queued on
    the readback stream, before it is rewritten."""
    done = _readbacks.pop(tokens.data_ptr(), None)
    if done is not None:
        torch.cuda.current_stream(tokens.device).wait_event(done)


@dataclass
class StepRows:
    """Which rows of the step's hidden states to turn into logits."""

    sample: list[tuple[Request, int]]  # (request, row of its last token) for requests that sample now
    prompt: list[tuple[Request, list[int], list[int]]]  # (request, rows, positions they predict) for prompt logprobs
    # the sample rows, then the prompt rows, as an int64 tensor already on the device (an eager step
    # stages it with its inputs; None for a graph step, whose rows are every row in order)
    device_rows: torch.Tensor | None = None

    @functools.cached_property
    def logit_rows(self) -> list[int]:
        """The rows to turn into logits: the sample rows, then the prompt rows (once the step is built)."""
        return [row for _, row in self.sample] + [row for _, rs, _ in self.prompt for row in rs]


@dataclass
class PendingTokens:
    """A step's sampled tokens still on the device (async scheduling), and each request's row.

    On CUDA their copy to the host is queued right behind the sampler, on a stream of its own
    (`READBACK_STREAM`), with an event after it: `token_ids()` then waits for this step alone. A
    plain `tokens.tolist()` would be queued behind the step launched after this one, so the host
    would wait for that step too, and nothing of its work would overlap the device's."""

    tokens: torch.Tensor  # [B] int64
    index: dict  # Request -> row of `tokens`
    _host: torch.Tensor | None = None  # (CUDA: the pinned copy, and the event that marks it done)
    _copied: "torch.cuda.Event | None" = None

    def __post_init__(self):
        # `tokens` may be a decode graph's output buffer, which a later replay rewrites: what is
        # read back is a snapshot taken now (on CUDA the copy queued here, after the step; the
        # replay that next writes that buffer waits for it, `wait_for_readback`)
        if self.tokens.is_cuda:
            self._host = torch.empty(self.tokens.shape, dtype=self.tokens.dtype, pin_memory=True)
            self._copied = torch.cuda.Event()
            if not READBACK_STREAM:
                self._host.copy_(self.tokens, non_blocking=True)
                self._copied.record()
                return
            device = self.tokens.device
            stream = _readback_streams.get(device)
            if stream is None:
                stream = _readback_streams[device] = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))  # (after the step that computes them)
            with torch.cuda.stream(stream):
                self._host.copy_(self.tokens, non_blocking=True)
                self._copied.record(stream)
            self.tokens.record_stream(stream)  # (its memory is not handed out again before the copy)
            _readbacks[self.tokens.data_ptr()] = self._copied
        else:
            self.tokens = self.tokens.clone()

    def token_ids(self) -> list[int]:
        if self._copied is None:
            return self.tokens.tolist()
        self._copied.synchronize()
        if _readbacks.get(self.tokens.data_ptr()) is self._copied:  # (done: no replay need wait for it)
            del _readbacks[self.tokens.data_ptr()]
        return self._host.tolist()


def fill_in(ids: torch.Tensor, tokens: torch.Tensor, rows: list[int], src: list[int],
            index: torch.Tensor | None = None) -> None:
    """ids[rows] = tokens[src], on the device, without waiting for `tokens` to be computed.
    `index`: [rows, src] as a [2, F] int64 tensor already on the device (else made here)."""
    if rows == src == list(range(rows[-1] + 1)):  # the usual decode step: the same requests, in order
        ids[:len(rows)].copy_(tokens[:len(rows)])
        return
    if index is None:
        index = _staged(ids.device, [[rows, src]])[0].view(2, -1)
    ids[index[0]] = tokens[index[1]]


def _staged(device: torch.device, fields: list) -> list[torch.Tensor]:
    """int64 sequences (lists, nested lists, numpy arrays) -> each flattened, on `device`, moved in
    one copy: through one pinned host buffer on CUDA, asynchronously. A copy from pageable memory
    waits for all the work queued before it (under async scheduling, the step in flight), and one
    copy per field costs a call each. Each field starts on a 64-byte boundary (Inductor's kernels
    copy inputs that are not aligned)."""
    arrays = [np.asarray(f, dtype=np.int64).reshape(-1) for f in fields]
    starts = np.cumsum([0] + [-(-a.size // 8) * 8 for a in arrays])
    cuda = device.type == "cuda"
    staged = torch.empty(max(int(starts[-1]), 1), dtype=torch.int64, pin_memory=cuda)
    buf = staged.numpy()
    for a, start in zip(arrays, starts):
        buf[start:start + a.size] = a
    on_device = staged.to(device, non_blocking=cuda)
    return [on_device[start:start + a.size] for a, start in zip(arrays, starts)]


def kv_cache_layers(model: nn.Module) -> list[tuple[int, int, int]]:
    """Per layer of KV cache: (num_kv_heads, key head dim, value head dim). A model whose layers
    differ (the Transformers backend measures its own) says so with `kv_cache_layers()`; the
    others give one `kv_cache_spec()` (num_layers, num_kv_heads, head_dim) for every layer."""
    if hasattr(model, "kv_cache_layers"):
        return model.kv_cache_layers()
    num_layers, heads, head_dim = model.kv_cache_spec()
    return [(heads, head_dim, head_dim)] * num_layers


class ModelRunner:
    def __init__(self, model: nn.Module, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device,
                 num_cross_slots: int = 0, kv_cache_dtype: torch.dtype | None = None,
                 kv_scales: list[tuple[float, float]] | None = None):
        """num_blocks 0: no KV cache (pooling models compute each sequence whole in one step).
        num_cross_slots: encoder-decoder models' cross-attention cache, one slot per request.
        kv_cache_dtype: the self-attention caches' dtype (default `dtype`; float8_e4m3fn for an fp8
        cache, whose per-layer (k_scale, v_scale) are kv_scales, default 1.0). Cross caches keep `dtype`."""
        self.model, self.block_size, self.device = model, block_size, device
        self.kv_scales = kv_scales
        self.forward = model  # replaced by the compiled forward when the engine compiles
        self.logits = model.compute_logits if hasattr(model, "compute_logits") else None  # (and traced when quantized)
        self.decode_graphs = None  # CUDA graphs of the decode step, when the engine captures them
        self.state_slots = None  # models with recurrent layers: per-request states (runtime/state_slots.py)
        self.num_blocks = num_blocks
        self.kv_caches = self.cross_kv_caches = None
        if num_cross_slots:
            num_layers, heads, head_dim = model.kv_cache_spec()
            shape = (num_cross_slots, model.encoder_len, heads, head_dim)
            self.cross_kv_caches = [(torch.zeros(shape, dtype=dtype, device=device),
                                     torch.zeros(shape, dtype=dtype, device=device)) for _ in range(num_layers)]
        if num_blocks > 0:
            # zeros, not empty: masked-out slots are still multiplied by 0 in attention, and 0 * NaN is NaN.
            # One block more than the block manager hands out: a scratch block for CUDA-graph padding rows.
            cache_dtype = kv_cache_dtype or dtype
            self.kv_caches = [(torch.zeros((num_blocks + 1, block_size, heads, k_dim), dtype=cache_dtype, device=device),
                               torch.zeros((num_blocks + 1, block_size, heads, v_dim), dtype=cache_dtype, device=device))
                              for heads, k_dim, v_dim in kv_cache_layers(model)]
            if kv_scales is not None and len(kv_scales) != len(self.kv_caches):
                raise ValueError(f"{len(kv_scales)} kv scales for {len(self.kv_caches)} KV-cache layers")

    @staticmethod
    def bytes_per_block(model: nn.Module, block_size: int, dtype: torch.dtype) -> int:
        """Bytes of one block over every layer's keys and values; dtype is the KV cache's."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return sum(block_size * heads * (k_dim + v_dim) * itemsize for heads, k_dim, v_dim in kv_cache_layers(model))

    @staticmethod
    def bytes_per_cross_slot(model: nn.Module, dtype: torch.dtype) -> int:
        num_layers, heads, head_dim = model.kv_cache_spec()
        return 2 * num_layers * model.encoder_len * heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @torch.inference_mode()
    def encode(self, requests: list[Request]) -> None:
        """Run the encoder once over these requests' inputs, batched, and write each decoder
        layer's cross keys and values into the requests' cross-cache slots."""
        dtype = self.cross_kv_caches[0][0].dtype
        features = torch.stack([r.encoder_input for r in requests]).to(self.device, dtype)
        slots = torch.tensor([r.cross_slot for r in requests], device=self.device)
        for (k_cache, v_cache), (k, v) in zip(self.cross_kv_caches, self.model.encode(features)):
            k_cache[slots], v_cache[slots] = k.to(dtype), v.to(dtype)
        for r in requests:
            r.encoded = True

    @torch.inference_mode()
    def execute(self, step: SchedulerOutput, fill: "PendingTokens | None" = None) -> tuple[torch.Tensor, StepRows]:
        """`fill` (async scheduling): the tokens the previous step sampled on the device, not read
        back yet; a request whose last token is one of them gets it on the device."""
        bs = self.block_size
        input_ids, positions, slots, query_lens, seq_lens = [], [], [], [], []
        fill_rows, fill_src = [], []
        rows = StepRows([], [])
        for req, n in step.scheduled:
            start, offset = req.num_computed_tokens, len(input_ids)
            pos = range(start, start + n)
            chunk = req.token_ids(start, start + n)
            if len(chunk) < n:  # the last one is still being sampled: a stand-in, filled on the device
                fill_rows.append(offset + n - 1)
                fill_src.append(fill.index[req])
                chunk = chunk + [0]
            input_ids.extend(chunk)
            positions.extend(pos)
            if self.kv_caches is not None:
                if n == 1:
                    slots.append(req.block_ids[start // bs] * bs + start % bs)
                else:  # (a prompt chunk: numpy, a quarter of a generator's cost per token)
                    p = np.arange(start, start + n)
                    slots.extend((np.asarray(req.block_ids)[p // bs] * bs + p % bs).tolist())
            query_lens.append(n)
            seq_lens.append(start + n)
            if start + n == req.num_tokens:
                rows.sample.append((req, offset + n - 1))
            if req.prompt_logprobs is not None:
                # logits at position p predict prompt token p + 1; skip what an earlier run (before a
                # preemption) already recorded
                first, end = max(start, len(req.prompt_logprobs) - 1), min(start + n, req.num_prompt_tokens - 1)
                if first < end:
                    rows.prompt.append((req, [offset + p - start for p in range(first, end)], list(range(first + 1, end + 1))))
        # a decode step a captured graph covers: its inputs go straight into the graph's buffers
        if (self.decode_graphs is not None and not rows.prompt and len(query_lens) == len(input_ids)
                and self.decode_graphs.fits(len(input_ids))):
            tables = [r.block_ids for r, _ in step.scheduled]
            cross = [r.cross_slot for r, _ in step.scheduled] if self.cross_kv_caches is not None else None
            filled = (fill.tokens, fill_rows, fill_src) if fill_rows else None
            return self.decode_graphs.run(input_ids, positions, slots, tables, seq_lens, cross, fill=filled), rows
        max_blocks = max(1, max(len(r.block_ids) for r, _ in step.scheduled))
        table = np.zeros((len(step.scheduled), max_blocks), dtype=np.int64)
        for i, (req, _) in enumerate(step.scheduled):  # (numpy: a row from a list costs a tenth of torch.tensor's)
            table[i, :len(req.block_ids)] = req.block_ids
        types = []
        if any(r.token_type_ids is not None for r, _ in step.scheduled):
            types = [t for r, n in step.scheduled
                     for t in (r.token_type_ids or [0] * r.num_tokens)[r.num_computed_tokens:r.num_computed_tokens + n]]
        # every input of the step in one copy (from pinned memory on CUDA: no wait for the step in
        # flight), the attention kernels' layout too (else their first layer copies it, and waits)
        ids, positions, slot_mapping, tables, fill_index, rows.device_rows, types, layout = _staged(
            self.device, [input_ids, positions, slots, table, [fill_rows, fill_src] if fill_rows else [],
                          rows.logit_rows, types, [0, *itertools.accumulate(query_lens), *seq_lens]])
        metadata = AttentionMetadata(
            slot_mapping=slot_mapping, block_tables=tables.view(table.shape), query_lens=query_lens,
            seq_lens=seq_lens, block_size=bs,
            cross_slots=[r.cross_slot for r, _ in step.scheduled] if self.cross_kv_caches is not None else None)
        layout = layout.to(torch.int32)  # (what the kernels take: codegen/triton_ops._batch_tensors)
        metadata.query_start_loc, metadata.seq_lens_tensor = layout[:len(seq_lens) + 1], layout[len(seq_lens) + 1:]
        extra = {"token_type_ids": types} if len(types) else {}
        if fill_rows:
            fill_in(ids, fill.tokens, fill_rows, fill_src, fill_index.view(2, -1))
        if self.state_slots is not None:
            return self._execute_per_sequence(step, ids, positions), rows
        with set_forward_context(ForwardContext(metadata, self.kv_caches, self.cross_kv_caches, self.kv_scales)):
            hidden = self.forward(ids, positions, **extra)
        return hidden, rows

    def _execute_per_sequence(self, step: SchedulerOutput, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Models with recurrent layers: each scheduled sequence's tokens run as their own forward,
        continuing from the request's state (fresh from its admission: a preempted request gave its slot back).
        ids, positions [T] (the step's flattened batch) -> hidden [T, H], rows in the same order."""
        hidden, offset = [], 0
        for req, n in step.scheduled:
            state = self.state_slots.state(req, self.model.new_state)
            hidden.append(self.model.forward_sequence(ids[offset:offset + n], positions[offset:offset + n], state))
            offset += n
        return torch.cat(hidden)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor, rows: list[int], index: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of hidden[rows]. `index`: the rows as a device tensor (a prefix of the step's
        staged `StepRows.device_rows`), so no copy waits here for the forward to finish."""
        if len(rows) == len(hidden) and rows == list(range(len(rows))):
            # every row (a decode step): no index to copy to the device, a copy that would wait
            # for the forward to finish before the host could queue the logits and the sampler
            captured = self.decode_graphs.logits_of(hidden) if self.decode_graphs is not None else None
            return captured if captured is not None else self.logits(hidden)
        if index is None:
            index = _staged(hidden.device, [rows])[0]
        return self.logits(hidden[index])

    def captured_greedy(self, logits: torch.Tensor) -> torch.Tensor | None:
        """The greedy tokens a decode graph computed with these logits (`compute_logits` returned
        its captured ones), else None."""
        return self.decode_graphs.greedy_of(logits) if self.decode_graphs is not None else None

    @torch.inference_mode()
    def execute_pooling(self, step: SchedulerOutput) -> tuple[torch.Tensor, PoolingBatch]:
        """A pooling step (whole prompts, no cache): the step's inputs built with numpy from each
        request's `prompt_token_array`, moved in one copy (asynchronous from pinned memory on CUDA)
        and the forward queued, without waiting for the device -> (hidden [T, H], its layout)."""
        reqs = [r for r, _ in step.scheduled]
        lens = [r.num_tokens for r in reqs]
        num_seqs, num_tokens = len(reqs), sum(lens)
        has_types = any(r.token_type_ids is not None for r in reqs)
        # one int64 buffer: input ids, positions, sequence ids, [token type ids], query_start_loc, each
        # field starting on a 64-byte boundary (Inductor's kernels assume aligned inputs, else copy them)
        stride = -(-num_tokens // 8) * 8
        cuda = self.device.type == "cuda"
        staged = torch.empty((3 + has_types) * stride + num_seqs + 1, dtype=torch.int64, pin_memory=cuda)
        buf = staged.numpy()
        ids, positions, seq_ids, types = (buf[i * stride:i * stride + num_tokens] for i in range(4))
        qsl = buf[len(buf) - num_seqs - 1:]
        qsl[0] = 0
        np.cumsum(lens, out=qsl[1:])
        np.concatenate([_prompt_array(r) for r in reqs], out=ids)
        seq_ids[:] = np.repeat(np.arange(num_seqs), lens)
        np.subtract(np.arange(num_tokens), qsl[:-1][seq_ids], out=positions)
        if has_types:
            np.concatenate([np.asarray(r.token_type_ids, dtype=np.int64) if r.token_type_ids is not None
                            else np.zeros(r.num_tokens, dtype=np.int64) for r in reqs], out=types)
        on_device = staged.to(self.device, non_blocking=cuda)
        ids_d, pos_d, seq_d, types_d = (on_device[i * stride:i * stride + num_tokens] for i in range(4))
        qsl_d = on_device[len(buf) - num_seqs - 1:]
        metadata = AttentionMetadata(
            slot_mapping=torch.empty(0, dtype=torch.long, device=self.device),
            block_tables=torch.zeros((num_seqs, 1), dtype=torch.long, device=self.device),
            query_lens=lens, seq_lens=lens, block_size=self.block_size)
        # the varlen attention kernel's layout, already on the device (no per-layer host copy)
        metadata.query_start_loc = qsl_d.to(torch.int32)
        metadata.seq_lens_tensor = (qsl_d[1:] - qsl_d[:-1]).to(torch.int32)
        extra = {"token_type_ids": types_d} if has_types else {}
        with set_forward_context(ForwardContext(metadata, None, None)):
            hidden = self.forward(ids_d, pos_d, **extra)
        return hidden, PoolingBatch(lens, qsl_d, seq_d, ids_d)


def _prompt_array(req: Request) -> np.ndarray:
    """A pooling request's prompt as int64 numpy (the prepared view, or made from the list)."""
    if req.prompt_token_array is None:
        req.prompt_token_array = np.asarray(req.prompt_token_ids, dtype=np.int64)
    return req.prompt_token_array
