"""Poolers: from a step's hidden states to each pooling request's output.

pool (LAST, MEAN, CLS, ALL, STEP rows of the sequence) -> the model's head, when the task has one
(classifier, score or reward head) -> the task's post-processing: Matryoshka truncation and L2
normalisation for embeddings, softmax (or sigmoid for one label) for class probabilities, the
step tokens' softmax over `returned_token_ids` for process reward models.

The work is queued on the device without waiting for it: the sequence layout comes as device
tensors (`PoolingBatch`), the outputs leave in one copy to the host, and `PooledStep.result()` is
the only point that waits, so the engine can queue the next step's forward first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kiln.runtime.pooling_params import PoolerConfig, PoolingParams

# Which tasks run the model's head on the pooled states.
HEAD_TASKS = ("classify", "score", "token_classify", "reward", "encode")
SEQUENCE_POOLING = ("CLS", "LAST", "MEAN")


@dataclass
class PoolingBatch:
    """How a pooling step's flattened rows split into sequences (built by the runner).

    lens: per sequence, its number of tokens (host ints); query_start_loc [B+1] int64, seq_ids [T]
    int64 (each row's sequence) and input_ids [T] int64 on the device."""

    lens: list[int]
    query_start_loc: torch.Tensor
    seq_ids: torch.Tensor
    input_ids: torch.Tensor


class PooledStep:
    """A step's outputs on their way to the host: one flat float32 tensor, copied with one
    (asynchronous, on CUDA) transfer. `result()` waits for it and cuts it into one tensor per
    request, in order: [D] for sequence pooling, [rows, D] for ALL and STEP."""

    def __init__(self, blocks: list[tuple[list[int], torch.Tensor, bool]], num_requests: int):
        # blocks: (request indices, outputs, per_row): a group's [n, D], one row per request, or
        # one request's [rows, D]
        self.blocks, self.num_requests, self.event, self.host = blocks, num_requests, None, None
        device = blocks[0][1].device
        if device.type != "cpu":
            flat = torch.cat([t.reshape(-1) for _, t, _ in blocks]) if len(blocks) > 1 else blocks[0][1].reshape(-1)
            cuda = device.type == "cuda"
            self.host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=cuda)
            self.host.copy_(flat, non_blocking=cuda)
            if cuda:
                self.event = torch.cuda.Event()
                self.event.record()
            # (the layout only: the device outputs are not kept alive until the step is collected)
            self.blocks = [(idx, t.shape, per_row) for idx, t, per_row in blocks]

    def result(self) -> list[torch.Tensor]:
        blocks = self.blocks
        if self.host is not None:
            if self.event is not None:
                self.event.synchronize()
            # the outputs are views of one pageable copy: views of the pinned buffer would keep it
            # page-locked, and from the allocator's reuse, for as long as a caller holds one
            flat = torch.empty(self.host.shape, dtype=self.host.dtype).copy_(self.host) \
                if self.host.is_pinned() else self.host
            blocks, offset = [], 0
            for idx, shape, per_row in self.blocks:
                blocks.append((idx, flat[offset:offset + shape.numel()].view(shape), per_row))
                offset += shape.numel()
        outputs: list[torch.Tensor] = [None] * self.num_requests
        for idx, data, per_row in blocks:
            if per_row:
                for i, row in zip(idx, data.unbind(0)):
                    outputs[i] = row
            else:
                outputs[idx[0]] = data
        return outputs


def pool_step(hidden: torch.Tensor, batch: PoolingBatch, params: list[PoolingParams], config: PoolerConfig,
              model) -> PooledStep:
    """A pooling step's outputs, one per request, in order (float32, on the host once `result()`).

    hidden [T, H] holds the step's sequences back to back, as `batch` says. Sequence-level
    pooling (CLS, LAST, MEAN) runs for the whole step at once; requests sharing a task and options
    form one group, which runs the model's head and the post-processing once; token-level
    requests (ALL, STEP) run the head together and are post-processed one by one. Only STEP
    pooling reads device values back (which rows are step tags); otherwise the host does not wait.
    """
    num = len(params)
    types = ["ALL" if p.task == "token_classify" else config.pooling_type for p in params]
    has_head = hasattr(model, "head")
    groups: dict[tuple, list[int]] = {}
    token_level: list[int] = []
    for i, (p, t) in enumerate(zip(params, types)):
        if t in SEQUENCE_POOLING:
            groups.setdefault((p.task, p.dimensions, p.normalize, p.activation), []).append(i)
        else:
            token_level.append(i)

    blocks: list[tuple[list[int], torch.Tensor, bool]] = []
    if groups:
        vectors = _pool_sequences(hidden, batch, config.pooling_type)  # [B, H], every sequence
        for idx in groups.values():
            p = params[idx[0]]
            rows = vectors if len(idx) == num else vectors[torch.tensor(idx).to(hidden.device, non_blocking=True)]
            if has_head and p.task in HEAD_TASKS:
                rows = model.head(rows)
            blocks.append((idx, finish(rows, p.task, p, config, config.pooling_type), True))
    if token_level:
        starts = [0]
        for n in batch.lens:
            starts.append(starts[-1] + n)
        pieces = []
        for i in token_level:
            rows = hidden[starts[i]:starts[i + 1]]
            if types[i] == "STEP" and config.step_tag_id is not None:
                rows = rows[batch.input_ids[starts[i]:starts[i + 1]] == config.step_tag_id]
            pieces.append(rows)
        heads = [has_head and params[i].task in HEAD_TASKS for i in token_level]
        if any(heads):  # one head call for every token-level request that needs it
            done = iter(model.head(torch.cat([x for x, h in zip(pieces, heads) if h])).split(
                [x.shape[0] for x, h in zip(pieces, heads) if h]))
            pieces = [next(done) if h else x for x, h in zip(pieces, heads)]
        for i, rows in zip(token_level, pieces):
            blocks.append(([i], finish(rows, params[i].task, params[i], config, types[i]), False))
    return PooledStep(blocks, num)


def _pool_sequences(hidden: torch.Tensor, batch: PoolingBatch, pooling_type: str) -> torch.Tensor:
    """One row per sequence: its first (CLS), last (LAST) or mean (MEAN, summed in float32) hidden state."""
    qsl = batch.query_start_loc
    if pooling_type == "CLS":
        return hidden[qsl[:-1]]
    if pooling_type == "LAST":
        return hidden[qsl[1:] - 1]
    sums = hidden.new_zeros((len(batch.lens), hidden.shape[1]), dtype=torch.float32).index_add_(
        0, batch.seq_ids, hidden.float())
    return (sums / (qsl[1:] - qsl[:-1]).unsqueeze(1)).to(hidden.dtype)


def finish(data: torch.Tensor, task: str, params: PoolingParams, config: PoolerConfig, pooling_type: str) -> torch.Tensor:
    """Post-process pooled (and head-applied) outputs for their task, over the last dim; float32."""
    data = data.float()
    if task == "embed":
        if params.dimensions is not None:
            if params.dimensions > data.shape[-1]:
                raise ValueError(f"PoolingParams.dimensions={params.dimensions} exceeds the embedding size {data.shape[-1]}")
            data = data[..., :params.dimensions]
        normalize = params.normalize if params.normalize is not None else (config.normalize if config.normalize is not None else True)
        if normalize:
            data = F.normalize(data, p=2, dim=-1)
    elif task in ("classify", "score", "token_classify"):
        activation = params.activation if params.activation is not None else (config.softmax if config.softmax is not None else True)
        if activation:
            data = data.softmax(-1) if data.shape[-1] > 1 else data.sigmoid()
    elif task == "reward" and pooling_type == "STEP":
        if config.returned_token_ids:
            data = data[..., config.returned_token_ids]
        if config.softmax is not False:
            data = data.softmax(-1)
    return data
