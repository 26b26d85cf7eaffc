"""Falcon (FalconForCausalLM): Falcon-7B's multi-query attention, Falcon-40B/180B's grouped
"new decoder architecture", and the sequential variant, all with rotary positions.

What sets it apart from the Llama family: one fused `query_key_value` projection whose output
interleaves the heads three ways (a layout per variant, `_split_qkv`), LayerNorms with biases, a
GELU MLP, and the attention and MLP reading the same normed input in parallel (`parallel_attn`),
their outputs summed into the residual together. ALiBi checkpoints (`alibi=True`, Falcon-RW)
are refused: HF rounds their biases to bfloat16 at absolute positions, unlike BLOOM's.
"""

from __future__ import annotations

import torch
from torch import nn

from kiln.ir import ops
from kiln.ir.ops import HF_ACTIVATIONS
from kiln.models.layers import Embedding, LMHead, LayerNorm, Linear, RotaryEmbedding


def _num_kv_heads(config) -> int:
    """The KV heads of the whole model (of a rank-local config too: its `num_kv_heads` is not one
    of the fields the shard divides, and its query heads are multiplied back)."""
    if config.new_decoder_architecture:
        return config.num_kv_heads
    return 1 if config.multi_query else config.num_attention_heads * getattr(config, "tp_size", 1)


def _ffn_size(config) -> int:
    return config.ffn_hidden_size or 4 * config.hidden_size


class FalconAttention(nn.Module):
    def __init__(self, config, layer_idx: int, max_positions: int):
        super().__init__()
        # under tensor parallelism the config is rank-local: its query heads are this rank's
        tp = getattr(config, "tp_size", 1)
        self.num_heads, self.num_kv_heads = config.num_attention_heads, _num_kv_heads(config) // tp
        self.head_dim = config.hidden_size // (self.num_heads * tp)
        self.layer_idx, self.scale = layer_idx, self.head_dim**-0.5
        self.new_decoder_architecture, self.multi_query = config.new_decoder_architecture, config.multi_query
        qkv_out = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.query_key_value = Linear(config.hidden_size, qkv_out, config.bias)
        self.dense = Linear(self.num_heads * self.head_dim, config.hidden_size, config.bias)
        self.rotary_emb = RotaryEmbedding(config, self.head_dim, max_positions)

    def _split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[T, (H + 2 Hkv) D] -> q [T, H, D], k and v [T, Hkv, D], as each variant lays them out."""
        D = self.head_dim
        if self.new_decoder_architecture:  # per KV group: its query heads, then its key, then its value
            groups = qkv.unflatten(-1, (self.num_kv_heads, self.num_heads // self.num_kv_heads + 2, D))
            return groups[:, :, :-2].flatten(1, 2), groups[:, :, -2], groups[:, :, -1]
        if not self.multi_query:  # per head: its query, key and value side by side
            heads = qkv.unflatten(-1, (self.num_heads, 3, D))
            return heads[:, :, 0], heads[:, :, 1], heads[:, :, 2]
        heads = qkv.unflatten(-1, (self.num_heads + 2, D))  # the query heads, then one key and one value
        return heads[:, :-2], heads[:, -2:-1], heads[:, -1:]

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split_qkv(self.query_key_value(x))
        q, k = self.rotary_emb(q.contiguous(), k.contiguous(), positions)
        out = ops.attention(q, k, v.contiguous(), self.layer_idx, self.scale)
        return self.dense(out.flatten(-2))


class FalconMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden, ffn = config.hidden_size, _ffn_size(config) // getattr(config, "tp_size", 1)
        self.dense_h_to_4h = Linear(hidden, ffn, config.bias)
        self.dense_4h_to_h = Linear(ffn, hidden, config.bias)
        self.act = HF_ACTIVATIONS[config.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(ops.activation(self.dense_h_to_4h(x), self.act))


class FalconDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, max_positions: int):
        super().__init__()
        self.self_attention = FalconAttention(config, layer_idx, max_positions)
        self.mlp = FalconMLP(config)
        self.parallel_attn, eps = config.parallel_attn, config.layer_norm_epsilon
        # Falcon-40B/180B norm the attention's and the MLP's inputs separately
        self.two_norms = config.new_decoder_architecture and (config.num_ln_in_parallel_attn or 2) == 2
        if self.two_norms:
            self.ln_attn, self.ln_mlp = LayerNorm(config.hidden_size, eps), LayerNorm(config.hidden_size, eps)
        else:
            self.input_layernorm = LayerNorm(config.hidden_size, eps)
            if not self.parallel_attn:
                self.post_attention_layernorm = LayerNorm(config.hidden_size, eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        if self.two_norms:
            attn_in, mlp_in = self.ln_attn(hidden), self.ln_mlp(hidden)
        else:
            attn_in = mlp_in = self.input_layernorm(hidden)
        attn = self.self_attention(positions, attn_in)
        if self.two_norms or self.parallel_attn:  # attention and MLP side by side, summed into the residual
            return hidden + attn + self.mlp(mlp_in)
        hidden = hidden + attn
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class FalconModel(nn.Module):
    def __init__(self, config, max_positions: int):
        super().__init__()
        self.word_embeddings = Embedding(config.vocab_size, config.hidden_size)
        self.h = nn.ModuleList(FalconDecoderLayer(config, i, max_positions) for i in range(config.num_hidden_layers))
        self.ln_f = LayerNorm(config.hidden_size, config.layer_norm_epsilon)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.word_embeddings(input_ids)
        for layer in self.h:
            hidden = layer(positions, hidden)
        return self.ln_f(hidden)


class FalconForCausalLM(LMHead, nn.Module):
    """input_ids [T] and positions [T] of a flattened batch -> hidden states [T, hidden_size]."""

    def __init__(self, config, architecture: str = "FalconForCausalLM", max_positions: int | None = None):
        super().__init__()
        if getattr(config, "alibi", False):
            raise ValueError(f"{architecture} with alibi=True (Falcon-RW) is not supported: its ALiBi biases are "
                             "rounded to bfloat16 at absolute positions, which the attention op's alibi_slopes "
                             "(exact, by distance) does not reproduce")
        if config.new_decoder_architecture and not config.parallel_attn:
            raise ValueError(f"{architecture}: new_decoder_architecture without parallel_attn is not a Falcon layout")
        self.config = config
        self.transformer = FalconModel(config, max_positions or config.max_position_embeddings)
        self.init_lm_head(config, tied_by_default=True)

    def kv_cache_spec(self) -> tuple[int, int, int]:
        """(layers, KV heads, head dim): the shape of the paged KV cache the runner allocates."""
        attn = self.transformer.h[0].self_attention
        return len(self.transformer.h), attn.num_kv_heads, attn.head_dim

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.transformer(input_ids, positions)

    def embeddings(self) -> Embedding:
        return self.transformer.word_embeddings

    ignored_weights = ("rotary_emb.inv_freq",)
    # Tensor parallelism (frontend/sharding.py). The fused query_key_value splits by rows as it is:
    # each of its layouts keeps a head's (or KV group's) query, key and value rows together, so N
    # contiguous row blocks are N sets of whole heads. Falcon-7B's one KV head cannot split.
    tp_plan = {"query_key_value": "colwise", "dense": "rowwise", "dense_h_to_4h": "colwise",
               "dense_4h_to_h": "rowwise", "word_embeddings": "vocab", "lm_head": "vocab"}

    @staticmethod
    def tp_sizes(config) -> dict[str, int]:
        """The sizes tensor parallelism splits that the config names otherwise (or not at all)."""
        return {"KV heads": _num_kv_heads(config), "ffn_hidden_size": _ffn_size(config)}

    # A base-model checkpoint (FalconModel) names its weights without "transformer." (models/adapters.py).
    base_model_prefixes = {"word_embeddings.": "transformer.word_embeddings.", "h.": "transformer.h.",
                           "ln_f.": "transformer.ln_f."}
