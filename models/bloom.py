"""BLOOM (BloomForCausalLM): no position embeddings; ALiBi instead, a per-head linear bias on the
attention scores by key-query distance (the attention op's `alibi_slopes`). LayerNorms with
biases (one more right after the embedding), a fused `query_key_value` projection laid out head
by head (query, key, value of head 0, then of head 1, ...), and a tanh-GELU MLP.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kiln.ir import ops
from kiln.models.layers import Embedding, LMHead, LayerNorm, Linear


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi's slopes [num_heads] float32: a geometric sequence from 2^(-8/n) for the largest
    power of two n <= num_heads, then the odd powers of the next one's base for the remaining heads."""
    n = 2 ** math.floor(math.log2(num_heads))
    slopes = [2 ** (-8 / n * i) for i in range(1, n + 1)]
    extra = [2 ** (-4 / n * i) for i in range(1, 2 * min(n, num_heads - n), 2)]
    return torch.tensor(slopes + extra, dtype=torch.float32)


class BloomAttention(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        # under tensor parallelism the config is rank-local: its heads are this rank's share
        self.tp_rank, self.tp_size = getattr(config, "tp_rank", 0), getattr(config, "tp_size", 1)
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // (self.num_heads * self.tp_size)
        self.layer_idx, self.scale = layer_idx, self.head_dim**-0.5
        width = self.num_heads * self.head_dim
        self.query_key_value = Linear(config.hidden_size, 3 * width, bias=True)
        self.dense = Linear(width, config.hidden_size, bias=True)
        self.register_buffer("alibi_slopes", torch.empty(0), persistent=False)

    def reset_buffers(self) -> None:
        """The slopes of this rank's heads: a slice of the whole model's (they depend on the head count)."""
        first = self.tp_rank * self.num_heads
        slopes = alibi_slopes(self.num_heads * self.tp_size)[first:first + self.num_heads]
        self.alibi_slopes = slopes.to(self.alibi_slopes.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        heads = self.query_key_value(x).unflatten(-1, (self.num_heads, 3, self.head_dim))
        q, k, v = (heads[:, :, i].contiguous() for i in range(3))
        out = ops.attention(q, k, v, self.layer_idx, self.scale, alibi_slopes=self.alibi_slopes)
        return self.dense(out.flatten(-2))


class BloomMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        width = 4 * config.hidden_size // getattr(config, "tp_size", 1)
        self.dense_h_to_4h = Linear(config.hidden_size, width, bias=True)
        self.dense_4h_to_h = Linear(width, config.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(ops.activation(self.dense_h_to_4h(x), "gelu_tanh"))


class BloomBlock(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        eps = config.layer_norm_epsilon
        self.input_layernorm = LayerNorm(config.hidden_size, eps)
        self.self_attention = BloomAttention(config, layer_idx)
        self.post_attention_layernorm = LayerNorm(config.hidden_size, eps)
        self.mlp = BloomMLP(config)
        # the residual stream carries the normed input instead of the input (some BLOOM variants)
        self.residual_after_norm = config.apply_residual_connection_post_layernorm

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        normed = self.input_layernorm(hidden)
        hidden = (normed if self.residual_after_norm else hidden) + self.self_attention(normed)
        normed = self.post_attention_layernorm(hidden)
        return (normed if self.residual_after_norm else hidden) + self.mlp(normed)


class BloomModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.word_embeddings = Embedding(config.vocab_size, config.hidden_size)
        self.word_embeddings_layernorm = LayerNorm(config.hidden_size, config.layer_norm_epsilon)
        self.h = nn.ModuleList(BloomBlock(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = LayerNorm(config.hidden_size, config.layer_norm_epsilon)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.word_embeddings_layernorm(self.word_embeddings(input_ids))
        for block in self.h:
            hidden = block(hidden)
        return self.ln_f(hidden)


class BloomForCausalLM(LMHead, nn.Module):
    """input_ids [T] and positions [T] of a flattened batch -> hidden states [T, hidden_size]
    (positions unused: ALiBi reads the distances from the batch layout)."""

    def __init__(self, config, architecture: str = "BloomForCausalLM", max_positions: int | None = None):
        super().__init__()
        self.config = config
        self.transformer = BloomModel(config)
        self.init_lm_head(config, tied_by_default=True)

    def kv_cache_spec(self) -> tuple[int, int, int]:
        """(layers, KV heads, head dim): the shape of the paged KV cache the runner allocates."""
        attn = self.transformer.h[0].self_attention
        return len(self.transformer.h), attn.num_heads, attn.head_dim

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.transformer(input_ids)

    def embeddings(self) -> Embedding:
        return self.transformer.word_embeddings

    # Tensor parallelism (frontend/sharding.py): query_key_value is laid out head by head, so N
    # contiguous row blocks are N sets of whole heads (each with its query, key and value).
    tp_plan = {"query_key_value": "colwise", "dense": "rowwise", "dense_h_to_4h": "colwise",
               "dense_4h_to_h": "rowwise", "word_embeddings": "vocab", "lm_head": "vocab"}

    @staticmethod
    def tp_sizes(config) -> dict[str, int]:
        """The MLP's width, which tensor parallelism splits and the config does not name."""
        return {"MLP width (4 x hidden_size)": 4 * config.hidden_size}

    # A base-model checkpoint (BloomModel) names its weights without "transformer." (models/adapters.py).
    base_model_prefixes = {f"{name}.": f"transformer.{name}."
                           for name in ("word_embeddings", "word_embeddings_layernorm", "h", "ln_f")}
