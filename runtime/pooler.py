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


def pool_rows(hidden: torch.Tensor, token_ids: list[int], pooling_type: str, step_tag_id: int | None) -> torch.Tensor:
    """hidden [L, H] of one sequence -> [H] (LAST, MEAN, CLS) or [rows, H] (ALL, STEP)."""
    if pooling_type == "LAST":
        return hidden[-1]
    if pooling_type == "CLS":
        return hidden[0]
    if pooling_type == "MEAN":
        return hidden.float().mean(0).to(hidden.dtype)
    if pooling_type == "STEP" and step_tag_id is not None:
        return hidden[torch.tensor(token_ids, device=hidden.device) == step_tag_id]
    return hidden  # ALL, or STEP without a tag: every token


def finish(data: torch.Tensor, task: str, params: PoolingParams, config: PoolerConfig, pooling_type: str,
           num_labels: int | None) -> torch.Tensor:
    """Post-process one request's pooled (and head-applied) output for its task; float32."""
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
