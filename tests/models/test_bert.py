"""Parity with HF transformers for the BERT family: every architecture, on a tiny random float32
checkpoint, run as one flattened batch of three sequences, gives HF's hidden states and logits
computed on each sequence alone."""

from __future__ import annotations

import importlib

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from kiln.frontend.loader import load_model
from kiln.ir import AttentionMetadata, ForwardContext, set_forward_context
from kiln.models import bert
from kiln.models.registry import resolve_architecture, supported_architectures

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=64, type_vocab_size=2, num_labels=3)
ROBERTA = dict(pad_token_id=1, bos_token_id=0, eos_token_id=2)
CONFIGS = {
    "Bert": lambda: transformers.BertConfig(**TINY),
    "Roberta": lambda: transformers.RobertaConfig(**TINY, **ROBERTA),
    "XLMRoberta": lambda: transformers.XLMRobertaConfig(**TINY, **ROBERTA, hidden_act="gelu_new"),
}
# architecture -> (config family, kiln class, task)
ARCHS = {
    "BertModel": ("Bert", "BertModel", "embed"),
    "BertForSequenceClassification": ("Bert", "BertForSequenceClassification", "classify"),
    "BertForTokenClassification": ("Bert", "BertForTokenClassification", "token_classify"),
    "RobertaModel": ("Roberta", "BertModel", "embed"),
    "RobertaForMaskedLM": ("Roberta", "BertModel", "embed"),
    "RobertaForSequenceClassification": ("Roberta", "RobertaForSequenceClassification", "classify"),
    "XLMRobertaModel": ("XLMRoberta", "BertModel", "embed"),
    "XLMRobertaForSequenceClassification": ("XLMRoberta", "RobertaForSequenceClassification", "classify"),
}
LENS = [5, 9, 3]


def build_hf(arch: str, path) -> torch.nn.Module:
    """A tiny random HF model saved to `path`; every weight (biases and norms too) perturbed off its init."""
    torch.manual_seed(0)
    config = CONFIGS[ARCHS[arch][0]]()
    config.architectures = [arch]
    hf = getattr(transformers, arch)(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(path)
    return hf


def load_kiln(arch: str, path) -> torch.nn.Module:
    config = transformers.AutoConfig.from_pretrained(path)
    cls = getattr(bert, ARCHS[arch][1])
    return load_model(cls, config, arch, torch.float32, torch.device("cpu"), str(path),
                      cls.usable_positions(config), progress=False)


def batch():
    """Three sequences (no pad token: ids >= 3), the second with a second segment."""
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, TINY["vocab_size"], (n,), generator=g) for n in LENS]
    types = [torch.zeros(n, dtype=torch.long) for n in LENS]
    types[1][4:] = 1
    return seqs, types


def run_kiln(model, seqs, types=None):
    ctx = ForwardContext(AttentionMetadata(slot_mapping=torch.zeros(0, dtype=torch.long),
                                           block_tables=torch.zeros(len(seqs), 1, dtype=torch.long),
                                           query_lens=LENS, seq_lens=LENS, block_size=16), None)
    positions = torch.cat([torch.arange(len(s)) for s in seqs])
    with torch.no_grad(), set_forward_context(ctx):
        return model(torch.cat(seqs), positions, None if types is None else torch.cat(types))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_matches_hf(arch, tmp_path):
    hf = build_hf(arch, tmp_path)
    model = load_kiln(arch, tmp_path)
    seqs, types = batch()
    hidden = run_kiln(model, seqs, types)
    cls_rows = torch.tensor([0, *LENS[:-1]]).cumsum(0)

    with torch.no_grad():
        ref_hidden = torch.cat([hf.base_model(input_ids=s[None], token_type_ids=t[None]).last_hidden_state[0]
                                for s, t in zip(seqs, types)])
        torch.testing.assert_close(hidden, ref_hidden, atol=1e-5, rtol=1e-5)
        task = ARCHS[arch][2]
        if task == "embed":
            assert not hasattr(model, "head") and model.default_pooling_type == "CLS"
            return
        ref_logits = [hf(input_ids=s[None], token_type_ids=t[None]).logits[0] for s, t in zip(seqs, types)]
        if task == "classify":
            assert model.default_pooling_type == "CLS"
            torch.testing.assert_close(model.head(hidden[cls_rows]), torch.stack(ref_logits), atol=1e-5, rtol=1e-5)
        else:
            assert model.default_pooling_type == "ALL"
            torch.testing.assert_close(model.head(hidden), torch.cat(ref_logits), atol=1e-5, rtol=1e-5)
        assert model.num_labels == TINY["num_labels"] and model.is_causal is False


def test_token_type_ids_default_to_zeros(tmp_path):
    build_hf("BertModel", tmp_path)
    model = load_kiln("BertModel", tmp_path)
    seqs, _ = batch()
    zeros = [torch.zeros_like(s) for s in seqs]
    torch.testing.assert_close(run_kiln(model, seqs), run_kiln(model, seqs, zeros), atol=0, rtol=0)


def test_base_model_loads_prefixed_checkpoint(tmp_path):
    """A BertModel served from the base of a BertForSequenceClassification checkpoint (`bert.` names,
    the pooler and an old `position_ids` buffer included)."""
    hf = build_hf("BertForSequenceClassification", tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    assert "bert.pooler.dense.weight" in weights
    weights = {n: w for n, w in weights.items() if n.startswith("bert.")}
    weights["bert.embeddings.position_ids"] = torch.arange(TINY["max_position_embeddings"])[None]
    save_file(weights, tmp_path / "model.safetensors")
    model = load_kiln("BertModel", tmp_path)
    assert all(not n.startswith(("bert.", "pooler.")) for n, _ in model.named_parameters())
    seqs, types = batch()
    with torch.no_grad():
        ref = torch.cat([hf.bert(input_ids=s[None], token_type_ids=t[None]).last_hidden_state[0]
                         for s, t in zip(seqs, types)])
    torch.testing.assert_close(run_kiln(model, seqs, types), ref, atol=1e-5, rtol=1e-5)


def test_unknown_weight_is_still_an_error(tmp_path):
    build_hf("BertModel", tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["encoder.layer.0.extra.weight"] = torch.ones(3)
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="encoder.layer.0.extra.weight"):
        load_kiln("BertModel", tmp_path)


def test_registry():
    entries = supported_architectures()
    for arch, (_, class_name, task) in ARCHS.items():
        entry = entries[arch]
        assert (entry.module, entry.class_name) == ("bert", class_name) and task in entry.tasks
        cls = getattr(importlib.import_module(f"kiln.models.{entry.module}"), entry.class_name)
        assert cls.is_causal is False and cls.default_pooling_type in ("CLS", "ALL")
    assert "BertForMaskedLM" not in entries
    with pytest.raises(ValueError, match="BertForMaskedLM"):
        resolve_architecture(["BertForMaskedLM"], "embed")  # unknown names stay unknown
    with pytest.raises(ValueError):
        resolve_architecture(["BertModel"], "generate")  # an encoder does not generate


def test_usable_positions():
    """RoBERTa's positions start at pad_token_id + 1: its table of 64 serves 62 tokens, and the last one
    matches HF."""
    assert bert.BertModel.usable_positions(CONFIGS["Bert"]()) == 64
    config = CONFIGS["Roberta"]()
    assert bert.RobertaForSequenceClassification.usable_positions(config) == 62
    with pytest.raises(ValueError, match="max_positions=64"):
        bert.BertModel(config, "RobertaModel", 64)


def test_longest_roberta_sequence_matches_hf(tmp_path):
    hf = build_hf("RobertaModel", tmp_path)
    model = load_kiln("RobertaModel", tmp_path)
    ids = torch.randint(3, TINY["vocab_size"], (62,), generator=torch.Generator().manual_seed(2))
    ctx = ForwardContext(AttentionMetadata(torch.zeros(0, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long),
                                           [62], [62], 16), None)
    with torch.no_grad(), set_forward_context(ctx):
        hidden = model(ids, torch.arange(62))
        torch.testing.assert_close(hidden, hf(input_ids=ids[None]).last_hidden_state[0], atol=1e-5, rtol=1e-5)


def test_unsupported_config_is_rejected():
    config = transformers.BertConfig(**TINY, hidden_act="gelu_10")
    with pytest.raises(ValueError, match="hidden_act"):
        bert.BertModel(config, "BertModel", 64)
    config = transformers.BertConfig(**TINY)
    config.position_embedding_type = "relative_key"
    with pytest.raises(ValueError, match="position_embedding_type"):
        bert.BertModel(config, "BertModel", 64)
