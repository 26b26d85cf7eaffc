"""Whisper (WhisperForConditionalGeneration): speech to text, an encoder-decoder transformer.

Encoder: log-mel features [80, 3000] -> two 1-D convolutions (the second with stride 2) with GELU
-> + sinusoidal positions -> pre-norm bidirectional layers -> [1500, d_model]. It runs once per
request (per 30-second window); each decoder layer's cross-attention keys and values are projected
from its output once (`cross_kv`) and kept in the cross-attention cache until the request ends.
Decoder: tokens + learned positions -> pre-norm layers of causal self-attention (paged KV cache),
cross-attention and an MLP -> logits through the tied token embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kiln.ir import AttentionMetadata, ForwardContext, ops, set_forward_context
from kiln.models.layers import Embedding, LayerNorm, Linear


def conv1d(x: torch.Tensor, conv: "Conv1d") -> torch.Tensor:
    """x [B, C_in, L] -> [B, L_out, C_out]: a kernel-3, padding-1 convolution written as windows + `linear`."""
    windows = F.pad(x, (1, 1)).unfold(2, 3, conv.stride)  # [B, C_in, L_out, 3]
    return ops.linear(windows.permute(0, 2, 1, 3).flatten(2), conv.weight.flatten(1), conv.bias)


class Conv1d(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 3), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_channels), requires_grad=False)
        self.stride = stride


class WhisperAttention(nn.Module):
    def __init__(self, d_model: int, num_heads: int, layer_idx: int):
        super().__init__()
        self.num_heads, self.head_dim, self.layer_idx = num_heads, d_model // num_heads, layer_idx
        self.scaling = self.head_dim**-0.5
        self.q_proj = Linear(d_model, d_model, bias=True)
        self.k_proj = Linear(d_model, d_model, bias=False)
        self.v_proj = Linear(d_model, d_model, bias=True)
        self.out_proj = Linear(d_model, d_model, bias=True)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, self.head_dim))

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        # as HF: q is scaled before the product, the attention itself unscaled
        q = self.heads(self.q_proj(x) * self.scaling)
        out = ops.attention(q, self.heads(self.k_proj(x)), self.heads(self.v_proj(x)), self.layer_idx, 1.0, 0, causal)
        return self.out_proj(out.flatten(-2))

    def cross(self, x: torch.Tensor) -> torch.Tensor:
        out = ops.cross_attention(self.heads(self.q_proj(x) * self.scaling), self.layer_idx, 1.0)
        return self.out_proj(out.flatten(-2))

    def project_kv(self, encoder_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """encoder_out [..., S, d_model] -> keys and values [..., S, H, D]."""
        return self.heads(self.k_proj(encoder_out)), self.heads(self.v_proj(encoder_out))


class _FeedForward(nn.Module):
    """fc1 -> activation -> fc2, held directly on the layer (HF's weight names: layers.N.fc1)."""

    def init_mlp(self, d_model: int, ffn_dim: int, act: str) -> None:
        self.fc1, self.fc2, self.act = Linear(d_model, ffn_dim, bias=True), Linear(ffn_dim, d_model, bias=True), act

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(ops.activation(self.fc1(x), self.act))


class WhisperEncoderLayer(_FeedForward):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        d = config.d_model
        self.self_attn = WhisperAttention(d, config.encoder_attention_heads, layer_idx)
        self.self_attn_layer_norm = LayerNorm(d, 1e-5)
        self.init_mlp(d, config.encoder_ffn_dim, ops.HF_ACTIVATIONS[config.activation_function])
        self.final_layer_norm = LayerNorm(d, 1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), causal=False)
        return x + self.mlp(self.final_layer_norm(x))


class WhisperDecoderLayer(_FeedForward):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        d = config.d_model
        self.self_attn = WhisperAttention(d, config.decoder_attention_heads, layer_idx)
        self.self_attn_layer_norm = LayerNorm(d, 1e-5)
        self.encoder_attn = WhisperAttention(d, config.decoder_attention_heads, layer_idx)
        self.encoder_attn_layer_norm = LayerNorm(d, 1e-5)
        self.init_mlp(d, config.decoder_ffn_dim, ops.HF_ACTIVATIONS[config.activation_function])
        self.final_layer_norm = LayerNorm(d, 1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), causal=True)
        x = x + self.encoder_attn.cross(self.encoder_attn_layer_norm(x))
        return x + self.mlp(self.final_layer_norm(x))


class WhisperEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        d = config.d_model
        self.conv1 = Conv1d(config.num_mel_bins, d, stride=1)
        self.conv2 = Conv1d(d, d, stride=2)
        self.embed_positions = Embedding(config.max_source_positions, d)
        self.layers = nn.ModuleList(WhisperEncoderLayer(config, i) for i in range(config.encoder_layers))
        self.layer_norm = LayerNorm(d, 1e-5)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [B, num_mel_bins, 2 * max_source_positions] -> [B * max_source_positions, d_model]."""
        x = ops.activation(conv1d(features, self.conv1), "gelu").transpose(1, 2)
        x = ops.activation(conv1d(x, self.conv2), "gelu")  # [B, S, d]
        x = (x + self.embed_positions.weight[: x.shape[1]]).flatten(0, 1)
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x)


class WhisperDecoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        d = config.d_model
        self.embed_tokens = Embedding(config.vocab_size, d)
        self.embed_positions = Embedding(config.max_target_positions, d)
        self.layers = nn.ModuleList(WhisperDecoderLayer(config, i) for i in range(config.decoder_layers))
        self.layer_norm = LayerNorm(d, 1e-5)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # (HF's Whisper defines scale_embedding but never applies it; neither does kiln)
        x = self.embed_tokens(input_ids) + self.embed_positions(positions)
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x)


class WhisperModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.encoder, self.decoder = WhisperEncoder(config), WhisperDecoder(config)


class WhisperForConditionalGeneration(nn.Module):
    """The runner's view: `forward` is the decoder over a flattened batch (its cross-attention
    reads the cross cache through the forward context); `encode` runs the encoder on a batch of
    feature windows and returns each decoder layer's cross keys and values."""

    is_encoder_decoder = True
    ignored_weights = ("proj_out.",)  # tied to the decoder's token embedding

    def __init__(self, config, architecture: str = "WhisperForConditionalGeneration", max_positions: int | None = None):
        super().__init__()
        self.config = config
        self.model = WhisperModel(config)
        self.num_heads = config.decoder_attention_heads
        self.head_dim = config.d_model // self.num_heads
        self.encoder_len = config.max_source_positions
        self.feature_shape = (config.num_mel_bins, 2 * config.max_source_positions)

    @staticmethod
    def usable_positions(config) -> int:
        return config.max_target_positions

    def kv_cache_spec(self) -> tuple[int, int, int]:
        return len(self.model.decoder.layers), self.num_heads, self.head_dim

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model.decoder(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return ops.logits(hidden, self.model.decoder.embed_tokens.weight)

    def encode(self, features: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """features [B, num_mel_bins, 3000] -> per decoder layer (keys, values), each [B, 1500, H, D]."""
        B, S = features.shape[0], self.encoder_len
        md = AttentionMetadata(slot_mapping=torch.zeros(0, dtype=torch.long, device=features.device),
                               block_tables=torch.zeros(B, 1, dtype=torch.long, device=features.device),
                               query_lens=[S] * B, seq_lens=[S] * B, block_size=S)
        with set_forward_context(ForwardContext(md, None)):
            out = self.model.encoder(features).unflatten(0, (B, S))
        return [layer.encoder_attn.project_kv(out) for layer in self.model.decoder.layers]
