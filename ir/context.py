"""The forward context: the batch's attention metadata and KV cache, set by the runner around
a forward pass and read by the `attention` op, so model code never sees scheduling."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

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
    # encoder-decoder models: per sequence, its slot in the cross-attention cache
    cross_slots: list[int] | None = None
    _padded: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    def padded_layout(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """For batching whole sequences padded to the longest: rows [B, L] int64, the flattened
        token row of each padded position (padding repeats a real row), and valid [B, L] bool.
        Computed once per step and shared by every layer."""
        if self._padded is None:
            lens = torch.tensor(self.query_lens, device=device)
            starts = torch.cumsum(lens, 0) - lens
            pos = torch.arange(max(self.query_lens), device=device)
            rows = (starts[:, None] + pos[None, :]).clamp(max=sum(self.query_lens) - 1)
            self._padded = (rows, pos[None, :] < lens[:, None])
        return self._padded


@dataclass
class ForwardContext:
    attn: AttentionMetadata
    # kv_caches[layer] = (key_cache, value_cache), each [num_blocks, block_size, num_kv_heads, head_dim];
    # None for models that keep no cache (encoders run the whole sequence in one step).
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]] | None
    # cross_kv_caches[layer] = (keys, values), each [num_slots, encoder_len, num_kv_heads, head_dim]:
    # an encoder-decoder request's encoder output projected once, read by `cross_attention`.
    cross_kv_caches: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    # kv_scales[layer] = (k_scale, v_scale) of an fp8 (float8_e4m3fn) KV cache: stored values are
    # k / k_scale, read back as cache * k_scale. None: 1.0 everywhere (and unused by other caches).
    kv_scales: list[tuple[float, float]] | None = None

    def kv_scale(self, layer: int) -> tuple[float, float]:
        return self.kv_scales[layer] if self.kv_scales is not None else (1.0, 1.0)


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
