"""A request as the scheduler sees it: its tokens, how many are in the KV cache, its blocks.

A generate request grows by one token per decode step. The same record serves the later kinds:
a pooling request has `max_tokens == 0` (it finishes when its prompt is computed) and an
encoder-decoder request will carry its encoder input and cross-attention blocks beside these.
"""

from __future__ import annotations

import enum
import time

import numpy as np
import torch

from kiln.runtime.pooling_params import PoolingParams
from kiln.runtime.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)


class Request:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams | None, max_tokens: int,
                 priority: int = 0, arrival_time: float | None = None, pooling_params: PoolingParams | None = None,
                 token_type_ids: list[int] | None = None):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.pooling_params = pooling_params
        self.token_type_ids = token_type_ids  # segment ids of a sentence pair (cross-encoders)
        # pooling requests: the prompt as int64 numpy (often a view of its batch's tokens), so that
        # a step's input ids are one concatenate
        self.prompt_token_array: np.ndarray | None = None
        # encoder-decoder requests: the encoder's input (e.g. log-mel features [80, 3000]), the
        # cross-attention cache slot holding its projected output, and whether it is written yet
        self.encoder_input: torch.Tensor | None = None
        self.cross_slot: int | None = None
        self.encoded = False
        # models with recurrent layers: the slot of runtime/state_slots.py holding this request's state
        self.state_slot: int | None = None
        self.max_tokens = max_tokens
        self.priority = priority
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.output_token_ids: list[int] = []
        # async scheduling: tokens sampled on the device but not read back yet; they count in
        # num_tokens (the scheduler plans the next step with them) but are not in output_token_ids
        self.num_pending = 0
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        # KV cache state, owned by the scheduler and block manager
        self.num_computed_tokens = 0
        self.block_ids: list[int] = []
        self.block_hashes: list[bytes] = []  # hashes of this request's full blocks, in order
        self.num_preemptions = 0
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at first admission
        # the user request this one belongs to (n > 1 fans out), and its index among the n
        self.parent = None
        self.index = 0
        # sampling state
        seed = params.seed if params is not None else None
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.cumulative_logprob = 0.0
        self.logprobs: list[dict] | None = [] if params is not None and params.logprobs is not None else None
        self.prompt_logprobs: list[dict | None] | None = (
            [None] if params is not None and params.prompt_logprobs is not None else None)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids(self, start: int, end: int) -> list[int]:
        """all_token_ids[start:end], without building all_token_ids (a long prompt copied for a
        few tokens, per request per step, adds up)."""
        prompt, output = self.prompt_token_ids, self.output_token_ids
        p = len(prompt)
        if start >= p:
            return output[start - p:end - p]
        if end <= p:
            return prompt[start:end]
        return prompt[start:] + output[:end - p]

    @property
    def num_tokens(self) -> int:
        """Tokens the request has, including one the device is still sampling (async scheduling)."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={self.block_ids})")
