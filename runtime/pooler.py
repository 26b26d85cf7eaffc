"""Poolers: from a step's hidden states to each pooling request's output.

pool (LAST, MEAN, CLS, ALL, STEP rows of the sequence) -> the model's head, when the task has one
(classifier, score or reward head) -> the task's post-processing: Matryoshka truncation and L2
normalisation for embeddings, softmax (or sigmoid for one label) for class probabilities, the
step tokens' softmax over `returned_token_ids` for process reward models.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.runtime.pooling_params import PoolerConfig, PoolingParams

# Which tasks run the model's head on the pooled states.
HEAD_TASKS = ("classify", "score", "token_classify", "reward", "encode")


def pool_step(hidden: torch.Tensor, token_ids: list[list[int]], params: list[PoolingParams], config: PoolerConfig,
              model) -> list[torch.Tensor]:
    """A pooling step's outputs, one per request, in order; float32 on the host.

    hidden [T, H] holds the step's sequences back to back (token_ids gives each one's tokens).
    Sequence-level pooling (CLS, LAST, MEAN) runs for the whole step at once, the model's head
    runs once over every row that needs it, and post-processing runs once per group of requests
    that share a task and options: the per-request cost is a few views, not kernel launches.
    """
    lens = torch.tensor([len(t) for t in token_ids], device=hidden.device)
    types = ["ALL" if p.task == "token_classify" else config.pooling_type for p in params]
    pieces: list[torch.Tensor] = [None] * len(params)  # [rows, H] per request
    seq_level = [i for i, t in enumerate(types) if t in ("CLS", "LAST", "MEAN")]
    if seq_level:
        ends = lens.cumsum(0)
        if config.pooling_type == "CLS":
            vectors = hidden[ends - lens]
        elif config.pooling_type == "LAST":
            vectors = hidden[ends - 1]
        else:  # MEAN, summed in float32
            segment = torch.repeat_interleave(torch.arange(len(params), device=hidden.device), lens)
            sums = torch.zeros(len(params), hidden.shape[1], device=hidden.device).index_add_(0, segment, hidden.float())
            vectors = (sums / lens[:, None]).to(hidden.dtype)
        for i, v in zip(seq_level, vectors[seq_level].split(1)):
            pieces[i] = v
    start = 0
    for i, (ids, t) in enumerate(zip(token_ids, types)):
        if pieces[i] is None:
            rows = hidden[start:start + len(ids)]
            if t == "STEP" and config.step_tag_id is not None:
                rows = rows[torch.tensor(ids, device=hidden.device) == config.step_tag_id]
            pieces[i] = rows
        start += len(ids)

    heads = [hasattr(model, "head") and p.task in HEAD_TASKS for p in params]
    if any(heads):
        done = iter(model.head(torch.cat([x for x, h in zip(pieces, heads) if h])).split(
            [x.shape[0] for x, h in zip(pieces, heads) if h]))
        pieces = [next(done) if h else x for x, h in zip(pieces, heads)]

    groups: dict[tuple, list[int]] = {}
    for i, (p, t) in enumerate(zip(params, types)):
        key = (p.task, t, p.dimensions, p.normalize, p.activation) if t in ("CLS", "LAST", "MEAN") else (i,)
        groups.setdefault(key, []).append(i)
    outputs: list[torch.Tensor] = [None] * len(params)
    for idx in groups.values():
        p, t = params[idx[0]], types[idx[0]]
        if t in ("CLS", "LAST", "MEAN"):
            done = finish(torch.cat([pieces[i] for i in idx]), p.task, p, config, t)
            for i, row in zip(idx, done):
                outputs[i] = row
        else:
            outputs[idx[0]] = finish(pieces[idx[0]], p.task, p, config, t)
    return to_cpu(outputs)


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


def to_cpu(outputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Move a step's outputs to the host in one copy (one sync) rather than one per request."""
    if not outputs or outputs[0].device.type == "cpu":
        return outputs
    flat = torch.cat([o.reshape(-1) for o in outputs]).cpu()
    return [chunk.view(o.shape) for chunk, o in zip(flat.split([o.numel() for o in outputs]), outputs)]
