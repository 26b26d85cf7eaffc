"""ModernBERT parity with HF: a flattened batch of three sequences (one longer than the local
window) through kiln equals HF run on each sequence alone."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import AutoConfig, ModernBertConfig

from kiln.frontend.loader import load_model
from kiln.ir import AttentionMetadata, ForwardContext, set_forward_context
from kiln.models import modernbert

LENS = [5, 20, 11]  # 20 > local_attention: the local layers' window matters


def tiny_config(**overrides) -> ModernBertConfig:
    return ModernBertConfig(
        vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        max_position_embeddings=128, local_attention=8, global_attn_every_n_layers=2, num_labels=3,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
        global_rope_theta=1000.0, local_rope_theta=50.0,  # apart, so a mixed-up base shows
        **overrides,
    )


def save_hf(arch: str, path, **overrides):
    """A random HF model of `arch` saved at `path`; returns it (eager attention, eval mode)."""
    torch.manual_seed(0)
    config = tiny_config(attn_implementation="eager", **overrides)
    model = getattr(transformers, arch)(config).eval()
    with torch.no_grad():  # HF's init is small; larger weights make every path show in the output
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    model.save_pretrained(path)
    return model


def run_kiln(model, ids: list[torch.Tensor]) -> torch.Tensor:
    lens = [len(x) for x in ids]
    md = AttentionMetadata(slot_mapping=torch.zeros(0, dtype=torch.long), block_tables=torch.zeros(len(ids), 1, dtype=torch.long),
                           query_lens=lens, seq_lens=lens, block_size=16)
    positions = torch.cat([torch.arange(n) for n in lens])
    with torch.no_grad(), set_forward_context(ForwardContext(md, None)):
        return model(torch.cat(ids), positions)


def load_kiln(arch: str, path):
    config = AutoConfig.from_pretrained(path)
    return load_model(getattr(modernbert, arch), config, arch, torch.float32, torch.device("cpu"), str(path), 64, progress=False)


def inputs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 99, (n,), generator=g) for n in LENS]


@pytest.mark.parametrize("overrides", [{}, dict(norm_bias=True, attention_bias=True, mlp_bias=True,
                                                hidden_activation="gelu_pytorch_tanh")])
def test_base_model_matches_hf(tmp_path, overrides):
    hf = save_hf("ModernBertModel", tmp_path, **overrides)
    model = load_kiln("ModernBertModel", tmp_path)
    assert model.default_pooling_type == "CLS" and not model.is_causal
    ids = inputs()
    out = run_kiln(model, ids)
    with torch.no_grad():
        expect = torch.cat([hf(input_ids=x[None]).last_hidden_state[0] for x in ids])
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5)


def pool(hidden: torch.Tensor, kind: str) -> torch.Tensor:
    rows, start = [], 0
    for n in LENS:
        seq = hidden[start:start + n]
        rows.append({"CLS": seq[0], "MEAN": seq.mean(0)}[kind])
        start += n
    return torch.stack(rows)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_sequence_classification_matches_hf(tmp_path, pooling):
    hf = save_hf("ModernBertForSequenceClassification", tmp_path, classifier_pooling=pooling, classifier_bias=True)
    model = load_kiln("ModernBertForSequenceClassification", tmp_path)
    assert model.default_pooling_type == pooling.upper() and model.num_labels == 3
    ids = inputs()
    logits = model.head(pool(run_kiln(model, ids), model.default_pooling_type))
    with torch.no_grad():
        expect = torch.cat([hf(input_ids=x[None]).logits for x in ids])
    torch.testing.assert_close(logits, expect, atol=1e-5, rtol=1e-5)


def test_token_classification_matches_hf(tmp_path):
    hf = save_hf("ModernBertForTokenClassification", tmp_path)
    model = load_kiln("ModernBertForTokenClassification", tmp_path)
    assert model.default_pooling_type == "ALL" and model.num_labels == 3
    ids = inputs()
    logits = model.head(run_kiln(model, ids))
    with torch.no_grad():
        expect = torch.cat([hf(input_ids=x[None]).logits[0] for x in ids])
    torch.testing.assert_close(logits, expect, atol=1e-5, rtol=1e-5)


def test_base_model_loads_the_encoder_of_a_task_checkpoint(tmp_path):
    hf = save_hf("ModernBertForSequenceClassification", tmp_path)
    model = load_kiln("ModernBertModel", tmp_path)
    ids = inputs()
    with torch.no_grad():
        expect = torch.cat([hf.model(input_ids=x[None]).last_hidden_state[0] for x in ids])
    torch.testing.assert_close(run_kiln(model, ids), expect, atol=1e-5, rtol=1e-5)
