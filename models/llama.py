"""The Llama family: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM.

One decoder, pre-norm, rotary, grouped-query attention and a SwiGLU MLP. What differs between the
variants is data (`FamilySpec`): which projections carry a bias, whether q and k are RMS-normed
per head (Qwen3), and which layers use a sliding window (read from the HF config).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kiln.ir import ops
from kiln.models.layers import Embedding, LMHead, Linear, RMSNorm, RotaryEmbedding


@dataclass(frozen=True)
class FamilySpec:
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False

    @staticmethod
    def for_architecture(arch: str, config) -> "FamilySpec":
        attention_bias = bool(getattr(config, "attention_bias", False))
        if arch.startswith("Qwen2"):
            return FamilySpec(qkv_bias=True)
        if arch.startswith("Qwen3"):
            return FamilySpec(qkv_bias=attention_bias, o_bias=attention_bias, qk_norm=True)
        return FamilySpec(qkv_bias=attention_bias, o_bias=attention_bias, mlp_bias=bool(getattr(config, "mlp_bias", False)))


def layer_sliding_windows(config) -> list[int]:
    """Per layer, the sliding window in tokens (0 = full attention), as HF decides it."""
    window = getattr(config, "sliding_window", None) or 0
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:  # Mistral: one window for every layer when the config sets one
        return [window] * config.num_hidden_layers
    return [window if t == "sliding_attention" else 0 for t in layer_types]


class LlamaAttention(nn.Module):
    def __init__(self, config, spec: FamilySpec, layer_idx: int, sliding_window: int, max_positions: int):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.layer_idx, self.sliding_window = layer_idx, sliding_window
        self.scale = self.head_dim**-0.5
        hidden = config.hidden_size
        self.q_proj = Linear(hidden, self.num_heads * self.head_dim, spec.qkv_bias)
        self.k_proj = Linear(hidden, self.num_kv_heads * self.head_dim, spec.qkv_bias)
        self.v_proj = Linear(hidden, self.num_kv_heads * self.head_dim, spec.qkv_bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, hidden, spec.o_bias)
        if spec.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = spec.qk_norm
        self.rotary_emb = RotaryEmbedding(config, self.head_dim, max_positions)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        q = self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim))
        k = self.k_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary_emb(q, k, positions)
        out = ops.attention(q, k, v, self.layer_idx, self.scale, self.sliding_window)
        return self.o_proj(out.flatten(-2))


class LlamaMLP(nn.Module):
    def __init__(self, config, spec: FamilySpec):
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, spec.mlp_bias)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, spec.mlp_bias)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, spec.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # gate and up are merged into one projection by the compiler's gate/up pass
        return self.down_proj(ops.silu_and_mul(torch.cat((self.gate_proj(x), self.up_proj(x)), dim=-1)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, spec: FamilySpec, layer_idx: int, sliding_window: int, max_positions: int):
        super().__init__()
        self.self_attn = LlamaAttention(config, spec, layer_idx, sliding_window, max_positions)
        self.mlp = LlamaMLP(config, spec)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions, hidden, residual):
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config, spec: FamilySpec, max_positions: int):
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        windows = layer_sliding_windows(config)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, spec, i, windows[i], max_positions) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(LMHead, nn.Module):
    """input_ids [T] and positions [T] of a flattened batch -> hidden states [T, hidden_size]."""

    def __init__(self, config, architecture: str = "LlamaForCausalLM", max_positions: int | None = None):
        super().__init__()
        self.config = config
        max_positions = max_positions or config.max_position_embeddings
        self.model = LlamaModel(config, FamilySpec.for_architecture(architecture, config), max_positions)
        self.init_lm_head(config, tied_by_default=False)

    def kv_cache_spec(self) -> tuple[int, int, int]:
        """(layers, KV heads, head dim): the shape of the paged KV cache the runner allocates."""
        attn = self.model.layers[0].self_attn
        return len(self.model.layers), attn.num_kv_heads, attn.head_dim

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def embeddings(self) -> Embedding:
        return self.model.embed_tokens

    # Checkpoint names that carry no weight kiln needs (old checkpoints saved the rope table).
    ignored_weights = ("rotary_emb.inv_freq",)
    # Sibling projections the loader lays out back to back, for the merge_linears pass.
    adjacent_weights = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
    # Tensor parallelism (frontend/sharding.py): module-name suffix -> how its weight splits over ranks.
    tp_plan = {"q_proj": "colwise", "k_proj": "colwise", "v_proj": "colwise", "o_proj": "rowwise",
               "gate_proj": "colwise", "up_proj": "colwise", "down_proj": "rowwise",
               "embed_tokens": "vocab", "lm_head": "vocab"}


class Qwen2ForRewardModel(LlamaForCausalLM):
    """Qwen2.5-Math-RM/PRM: the decoder and a two-layer `score` head (linear, ReLU, linear) giving
    `num_labels` values per token; the RM reads all tokens, the PRM the step tags (softmax of 2)."""

    is_causal = True
    default_pooling_type = "ALL"
    ignored_weights = LlamaForCausalLM.ignored_weights + ("lm_head.",)

    def __init__(self, config, architecture: str = "Qwen2ForRewardModel", max_positions: int | None = None):
        super().__init__(config, architecture, max_positions)
        if hasattr(self, "lm_head"):
            del self.lm_head
        self.num_labels = config.num_labels
        self.score = nn.ModuleDict({"0": Linear(config.hidden_size, config.hidden_size, bias=True),
                                    "2": Linear(config.hidden_size, self.num_labels, bias=True)})

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.score["2"](ops.activation(self.score["0"](pooled), "relu"))


class Qwen2ForProcessRewardModel(Qwen2ForRewardModel):
    default_pooling_type = "STEP"
