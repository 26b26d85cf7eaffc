"""ModernBERT: ModernBertModel, ModernBertForSequenceClassification, ModernBertForTokenClassification.

A bidirectional encoder, pre-norm with LayerNorms (no bias by default), a fused Wqkv projection,
rotary positions and a GeGLU MLP. Layers alternate between global attention and local attention
over a window of `local_attention` tokens centred on each query (|q - k| <= local_attention // 2);
the two kinds use different rope bases (HF keeps one rope parameter set per layer type). Every
sequence is encoded whole in one step, with no KV cache.
"""

from __future__ import annotations

import torch
from torch import nn

from kiln.ir import ops
from kiln.models.layers import Embedding, LayerNorm, Linear, RotaryEmbedding


def layer_types(config) -> list[str]:
    """Per layer, "full_attention" or "sliding_attention", as HF decides it."""
    types = getattr(config, "layer_types", None)
    if types is None:  # configs written before transformers 5: every n-th layer is global
        n = config.global_attn_every_n_layers
        types = ["full_attention" if i % n == 0 else "sliding_attention" for i in range(config.num_hidden_layers)]
    return list(types)


def _activation_kind(config, field: str) -> str:
    name = getattr(config, field)
    if name not in ops.HF_ACTIVATIONS:
        raise ValueError(f"ModernBERT {field}={name!r} is not supported; supported: {', '.join(sorted(ops.HF_ACTIVATIONS))}")
    return ops.HF_ACTIVATIONS[name]


class ModernBertEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.tok_embeddings = Embedding(config.vocab_size, config.hidden_size)
        self.norm = LayerNorm(config.hidden_size, config.norm_eps, config.norm_bias)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.norm(self.tok_embeddings(input_ids))


class ModernBertAttention(nn.Module):
    def __init__(self, config, layer_idx: int, layer_type: str, max_positions: int):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.layer_idx = layer_idx
        self.scale = self.head_dim**-0.5
        # `local_attention` is the whole window; the bidirectional attention op keeps |q - k| <= W // 2
        self.sliding_window = config.local_attention if layer_type == "sliding_attention" else 0
        self.Wqkv = Linear(config.hidden_size, 3 * self.num_heads * self.head_dim, config.attention_bias)
        self.Wo = Linear(config.hidden_size, config.hidden_size, config.attention_bias)
        self.rotary_emb = RotaryEmbedding(config, self.head_dim, max_positions, layer_type=layer_type)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.Wqkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).unbind(-3)
        q, k = self.rotary_emb(q, k, positions)
        out = ops.attention(q, k, v, self.layer_idx, self.scale, self.sliding_window, False)
        return self.Wo(out.flatten(-2))


class ModernBertMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.act = _activation_kind(config, "hidden_activation")
        if self.act not in ("gelu", "gelu_tanh", "silu"):
            raise ValueError(f"ModernBERT hidden_activation={config.hidden_activation!r} has no gated kiln op")
        self.Wi = Linear(config.hidden_size, 2 * config.intermediate_size, config.mlp_bias)
        self.Wo = Linear(config.intermediate_size, config.hidden_size, config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.Wi(x)  # (input, gate) -> act(input) * gate
        h = ops.silu_and_mul(h) if self.act == "silu" else ops.gelu_and_mul(h, "tanh" if self.act == "gelu_tanh" else "none")
        return self.Wo(h)


class ModernBertEncoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, layer_type: str, max_positions: int):
        super().__init__()
        # the embeddings end in a norm already, so the first layer does not norm its input again
        self.attn_norm = nn.Identity() if layer_idx == 0 else LayerNorm(config.hidden_size, config.norm_eps, config.norm_bias)
        self.attn = ModernBertAttention(config, layer_idx, layer_type, max_positions)
        self.mlp_norm = LayerNorm(config.hidden_size, config.norm_eps, config.norm_bias)
        self.mlp = ModernBertMLP(config)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.attn(positions, self.attn_norm(hidden))
        return hidden + self.mlp(self.mlp_norm(hidden))


class ModernBertEncoder(nn.Module):
    """HF's ModernBertModel: input_ids [T] and positions [T] of a flattened batch -> hidden [T, hidden_size]."""

    def __init__(self, config, max_positions: int):
        super().__init__()
        self.embeddings = ModernBertEmbeddings(config)
        self.layers = nn.ModuleList(
            ModernBertEncoderLayer(config, i, t, max_positions) for i, t in enumerate(layer_types(config))
        )
        self.final_norm = LayerNorm(config.hidden_size, config.norm_eps, config.norm_bias)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embeddings(input_ids)
        for layer in self.layers:
            hidden = layer(positions, hidden)
        return self.final_norm(hidden)


class ModernBertClassifierHead(nn.Module):
    """HF's prediction head (dense -> act -> norm) then the classifier: [N, hidden_size] -> [N, num_labels]."""

    def __init__(self, config):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size, config.classifier_bias)
        self.act = _activation_kind(config, "classifier_activation")
        self.norm = LayerNorm(config.hidden_size, config.norm_eps, config.norm_bias)
        self.classifier = Linear(config.hidden_size, config.num_labels, bias=True)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.norm(ops.activation(self.dense(pooled), self.act)))


# Checkpoint names outside the encoder: an MLM or task head a bare encoder does not use.
_HEAD_WEIGHTS = ("head.", "decoder.", "classifier.")


class ModernBertModel(ModernBertEncoder):
    """The bare encoder (an embedding model). Loads its own checkpoints and the encoder of any
    ModernBERT task checkpoint, whose encoder weights sit under "model."."""

    default_pooling_type = "CLS"
    is_causal = False
    weight_prefix_map = {"model.": ""}
    ignored_weights = _HEAD_WEIGHTS

    def __init__(self, config, architecture: str = "ModernBertModel", max_positions: int | None = None):
        super().__init__(config, max_positions or config.max_position_embeddings)
        self.config = config

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, token_type_ids: torch.Tensor | None = None):
        return super().forward(input_ids, positions)  # ModernBERT has no token types


class _ModernBertForTask(nn.Module):
    """Encoder under "model.", then `head` (prediction head and classifier) on pooled rows."""

    is_causal = False
    # HF keeps the classifier beside the prediction head; kiln nests it so that `head` is the whole head.
    weight_prefix_map = {"classifier.": "head.classifier."}

    def __init__(self, config, architecture: str | None = None, max_positions: int | None = None):
        super().__init__()
        self.config = config
        self.num_labels = config.num_labels
        self.model = ModernBertEncoder(config, max_positions or config.max_position_embeddings)
        self.head = ModernBertClassifierHead(config)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, token_type_ids: torch.Tensor | None = None):
        return self.model(input_ids, positions)


class ModernBertForSequenceClassification(_ModernBertForTask):
    """One label set per sequence, from its CLS row or the mean of its rows, as the checkpoint's
    `classifier_pooling` says (the pooling HF trains with)."""

    default_pooling_type = "CLS"  # per model: set from the config below

    def __init__(self, config, architecture: str = "ModernBertForSequenceClassification", max_positions: int | None = None):
        super().__init__(config, architecture, max_positions)
        pooling = getattr(config, "classifier_pooling", "cls")
        if pooling not in ("cls", "mean"):
            raise ValueError(f"ModernBERT classifier_pooling={pooling!r} is not supported; supported: cls, mean")
        self.default_pooling_type = pooling.upper()


class ModernBertForTokenClassification(_ModernBertForTask):
    """One label set per token."""

    default_pooling_type = "ALL"
