"""The forward context: the batch's attention metadata and KV cache, set by the runner around
a forward pass and read by the `attention` op, so model code never sees scheduling."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """How the flattened tokens of one step split into sequences.

    The batch is flattened: sequence i owns query rows `query_start_loc[i]:query_start_loc[i+1]`
    and, after this step, holds `seq_lens[i]` tokens of context (cached ones included), the
    last `query_lens[i]` of which are this step's queries.
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64: KV-cache slot (block * block_size + offset) per token
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int64, padded with 0
    query_lens: list[int]  # per sequence, tokens computed this step
    seq_lens: list[int]  # per sequence, context length after this step
    block_size: int

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)


@dataclass
class ForwardContext:
    attn: AttentionMetadata
    # kv_caches[layer] = (key_cache, value_cache), each [num_blocks, block_size, num_kv_heads, head_dim];
    # None for models that keep no cache (encoders run the whole sequence in one step).
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]] | None


_current: ForwardContext | None = None


def get_forward_context() -> ForwardContext:
    if _current is None:
        raise RuntimeError("kiln attention called outside a forward context: run the model through the runner")
    return _current


@contextlib.contextmanager
def set_forward_context(ctx: ForwardContext):
    global _current
    prev, _current = _current, ctx
    try:
        yield
    finally:
        _current = prev
