"""The shared layer set: thin modules that hold HF-named parameters and call kiln ops."""

from __future__ import annotations

import torch
from torch import nn

from kiln.ir import ops
from kiln.models.rope import rope_cos_sin_cache


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias)


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return ops.embedding(input_ids, self.weight)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Without residual: rms_norm(x). With it: (rms_norm(x + residual), x + residual)."""
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps)
        return ops.add_rms_norm(x, residual, self.weight, self.eps)


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(dim), requires_grad=False) if bias else None
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.layer_norm(x, self.weight, self.bias, self.eps)


class RotaryEmbedding(nn.Module):
    """Holds the cos/sin table of a HF config's rope variant; `reset_buffers` fills it after the
    model is materialised from the meta device (the table is not in the checkpoint). `layer_type`
    selects per-layer-type rope parameters (ModernBERT: "full_attention" / "sliding_attention")."""

    def __init__(self, config, head_dim: int, max_positions: int, is_neox: bool = True, layer_type: str | None = None):
        super().__init__()
        self.config, self.head_dim, self.max_positions, self.is_neox = config, head_dim, max_positions, is_neox
        self.layer_type = layer_type
        self.register_buffer("cos_sin_cache", torch.empty(0), persistent=False)
        if not self.cos_sin_cache.is_meta:
            self.reset_buffers()

    def reset_buffers(self) -> None:
        device = self.cos_sin_cache.device
        self.cos_sin_cache = rope_cos_sin_cache(self.config, self.head_dim, self.max_positions, self.layer_type).to(device)

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor):
        return ops.rotary(q, k, positions, self.cos_sin_cache, self.is_neox)


class LMHead:
    """Mixed into a decoder: its output projection is the embedding table (`embeddings()`) when
    tied, else its own `lm_head`; `compute_logits` runs through it."""

    def init_lm_head(self, config, tied_by_default: bool) -> None:
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", tied_by_default))
        if not self.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The output projection's weight [vocab, hidden]: the embedding table when tied."""
        return (self.embeddings() if self.tie_word_embeddings else self.lm_head).weight

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden_size] -> float32 logits [N, vocab_size]."""
        return ops.logits(hidden, self.lm_head_weight)
