"""Encoder models end to end through the LLM pooling API, against HF transformers on tiny random
checkpoints with a locally trained WordPiece tokenizer: embeddings, cross-encoder scores (sentence
pairs with token type ids), sequence and token classification."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers

from kiln import LLM
from kiln.runtime.demo import train_wordpiece_tokenizer

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France.", "Hello there"]


@pytest.fixture(scope="module")
def wordpiece():
    return train_wordpiece_tokenizer()


def build(tmp_path, wordpiece, config_cls: str, model_cls: str, **overrides):
    fields = dict(vocab_size=len(wordpiece), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=37, max_position_embeddings=64, pad_token_id=0)
    fields.update(overrides)
    config = getattr(transformers, config_cls)(**fields)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # move every weight off its init so biases and norms are really checked
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path / model_cls
    model.save_pretrained(path)
    wordpiece.save_pretrained(path)
    return str(path), model


def hf_inputs(wordpiece, a, b=None):
    return wordpiece(a, b, return_tensors="pt")


@pytest.mark.parametrize("config_cls, model_cls", [
    ("BertConfig", "BertModel"), ("RobertaConfig", "RobertaModel"), ("XLMRobertaConfig", "XLMRobertaModel"),
    ("ModernBertConfig", "ModernBertModel"),
])
def test_embed_is_the_normalised_cls_state(tmp_path, wordpiece, config_cls, model_cls):
    extra = {"type_vocab_size": 1} if "Roberta" in config_cls else {}
    path, hf = build(tmp_path, wordpiece, config_cls, model_cls, **extra)
    outs = LLM(path, runner="pooling").embed(TEXTS, use_tqdm=False)
    for text, out in zip(TEXTS, outs):
        with torch.no_grad():
            ref = F.normalize(hf(**hf_inputs(wordpiece, text)).last_hidden_state[0, 0], dim=-1)
        assert F.cosine_similarity(ref, torch.tensor(out.outputs.embedding), dim=0) >= 0.9999


@pytest.mark.parametrize("config_cls, model_cls", [
    ("BertConfig", "BertForSequenceClassification"), ("RobertaConfig", "RobertaForSequenceClassification"),
    ("XLMRobertaConfig", "XLMRobertaForSequenceClassification"), ("ModernBertConfig", "ModernBertForSequenceClassification"),
])
def test_cross_encoder_score_matches_hf(tmp_path, wordpiece, config_cls, model_cls):
    path, hf = build(tmp_path, wordpiece, config_cls, model_cls, num_labels=1)
    llm = LLM(path, runner="pooling")
    query, docs = "capital of France", ["Paris is the capital of France.", "The sea is calm."]
    for doc, out in zip(docs, llm.score(query, docs, use_tqdm=False)):
        with torch.no_grad():
            ref = hf(**hf_inputs(wordpiece, query, doc)).logits[0, 0].sigmoid()
        assert out.outputs.score == pytest.approx(ref.item(), abs=1e-5)


def test_classify_probabilities_match_hf(tmp_path, wordpiece):
    path, hf = build(tmp_path, wordpiece, "BertConfig", "BertForSequenceClassification", num_labels=3)
    for text, out in zip(TEXTS, LLM(path, runner="pooling").classify(TEXTS, use_tqdm=False)):
        with torch.no_grad():
            ref = hf(**hf_inputs(wordpiece, text)).logits[0].softmax(-1)
        torch.testing.assert_close(torch.tensor(out.outputs.probs), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config_cls, model_cls", [
    ("BertConfig", "BertForTokenClassification"), ("ModernBertConfig", "ModernBertForTokenClassification"),
])
def test_token_classification_matches_hf(tmp_path, wordpiece, config_cls, model_cls):
    path, hf = build(tmp_path, wordpiece, config_cls, model_cls, num_labels=5)
    llm = LLM(path, runner="pooling")
    outs = llm.encode(TEXTS, pooling_task="token_classify", use_tqdm=False)
    for text, out in zip(TEXTS, outs):
        with torch.no_grad():
            ref = hf(**hf_inputs(wordpiece, text)).logits[0].softmax(-1)
        assert out.outputs.data.shape == ref.shape
        torch.testing.assert_close(out.outputs.data, ref, atol=1e-5, rtol=1e-5)
    raw = llm.encode(TEXTS[0], use_tqdm=False)[0].outputs.data  # the model's own output: per-token logits
    with torch.no_grad():
        torch.testing.assert_close(raw, hf(**hf_inputs(wordpiece, TEXTS[0])).logits[0], atol=1e-5, rtol=1e-5)


def test_encoder_bad_input(tmp_path, wordpiece):
    path, _ = build(tmp_path, wordpiece, "BertConfig", "BertModel")
    llm = LLM(path, runner="pooling")
    with pytest.raises(ValueError, match="max_model_len=64"):
        llm.embed(" ".join(["word"] * 100), use_tqdm=False)
    assert len(llm.embed(" ".join(["word"] * 100), truncate_prompt_tokens=-1, use_tqdm=False)[0].prompt_token_ids) == 64
    with pytest.raises(ValueError, match="not 'classify'"):
        llm.classify("hello", use_tqdm=False)
    with pytest.raises(ValueError, match="not supported for runner='generate'"):  # BertModel cannot generate
        LLM(path)
    assert len(llm.embed(TEXTS, use_tqdm=False)) == 3
