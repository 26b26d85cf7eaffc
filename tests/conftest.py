"""Shared fixtures: tiny checkpoints built once per session (nothing is downloaded)."""

from __future__ import annotations

import pytest

from kiln.runtime.demo import build_checkpoint, train_tokenizer

ARCHITECTURES = ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "FalconForCausalLM",
                 "BloomForCausalLM"]

# Per architecture, the config features its parity test exercises beyond the defaults.
ARCH_OVERRIDES = {
    "LlamaForCausalLM": dict(attention_bias=True, tie_word_embeddings=True,
                             rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 64}),
    "MistralForCausalLM": dict(sliding_window=8),
    "Qwen2ForCausalLM": dict(use_sliding_window=True, sliding_window=8, max_window_layers=1,
                             rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                              "original_max_position_embeddings": 128}),
    "Qwen3ForCausalLM": dict(tie_word_embeddings=True),
    # Falcon-40B's layout: grouped KV heads, the attention's and MLP's inputs normed apart; and biases
    "FalconForCausalLM": dict(new_decoder_architecture=True, num_kv_heads=2, num_ln_in_parallel_attn=2, bias=True),
    # six heads: ALiBi's slopes for a head count that is not a power of two
    "BloomForCausalLM": dict(hidden_size=48, num_attention_heads=6),
}


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer()


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, tokenizer):
    """architecture -> path of a tiny random float32 checkpoint."""
    root = tmp_path_factory.mktemp("ckpt")
    return {arch: build_checkpoint(str(root / arch), arch, tokenizer=tokenizer, **ARCH_OVERRIDES[arch])
            for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def llama_path(checkpoints):
    return checkpoints["LlamaForCausalLM"]
