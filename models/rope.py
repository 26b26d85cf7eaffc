"""Rotary tables for the HF rope-scaling variants, computed with transformers' own functions."""

from __future__ import annotations

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


def rope_parameters(config, layer_type: str | None = None) -> dict:
    """The rope parameters of `config`; with `layer_type`, those of that kind of layer (configs
    such as ModernBERT's keep one set per layer type: "full_attention", "sliding_attention")."""
    if layer_type is not None:
        return config.rope_parameters[layer_type]
    params = getattr(config, "rope_parameters", None) or {}
    if "rope_type" not in params:  # configs written before transformers 5 keep rope_scaling/rope_theta
        scaling = getattr(config, "rope_scaling", None) or {}
        params = {"rope_theta": getattr(config, "rope_theta", 10000.0), **scaling}
        params["rope_type"] = scaling.get("rope_type", scaling.get("type", "default"))
    return params


def rope_cos_sin_cache(config, head_dim: int, max_positions: int, layer_type: str | None = None) -> torch.Tensor:
    """[max_positions, rotary_dim] float32: cos | sin of position * inv_freq, times the variant's
    attention factor (yarn scales both). `layer_type` picks per-layer-type rope parameters."""
    params = rope_parameters(config, layer_type)
    per_type = {"layer_type": layer_type} if layer_type is not None else {}
    rope_type = params["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope_type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    if rope_type == "default":
        dim = int(head_dim * partial)
        inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        attention_factor = 1.0
    elif rope_type == "dynamic":
        # HF rescales per batch once a sequence outgrows max_position_embeddings; a static table
        # cannot, so (as vLLM) we fix the base for the longest length the engine will serve.
        seq_len = max(max_positions, config.max_position_embeddings)
        inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", seq_len=seq_len, **per_type)
    else:
        inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", **per_type)
    freqs = torch.arange(max_positions, dtype=torch.float)[:, None] * inv_freq.float()[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1) * attention_factor
