"""The pooling runtime on a tiny BERT: many steps give what one prompt at a time gives, a step
stays in flight while the next is queued (and an abort reaches it), an offline call tokenizes its
prompts in chunks while the steps run, the batched tokenization
gives the tokenizer's own ids, and mixed options in one step are grouped right."""

from __future__ import annotations

import random
import threading

import pytest
import torch
import transformers

from kiln import LLM, PoolingParams
from kiln.runtime.demo import train_wordpiece_tokenizer
from kiln.runtime.engine import PreparedPrompt
from kiln.runtime.outputs import EmbeddingOutput

WORDS = "the quick brown fox jumps over lazy dog paris france capital question answer number".split()


@pytest.fixture(scope="module")
def bert_path(tmp_path_factory):
    tokenizer = train_wordpiece_tokenizer()
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=37, max_position_embeddings=64)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bert")
    transformers.BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 20))) for _ in range(n)]


def test_many_steps_give_what_one_prompt_at_a_time_gives(bert_path):
    texts = sentences(40)
    llm = LLM(bert_path, runner="pooling", pooler_config={"pooling_type": "MEAN"}, max_num_batched_tokens=64)
    outs = llm.embed(texts, use_tqdm=False)
    tokenizer = llm.get_tokenizer()
    assert [o.prompt_token_ids for o in outs] == tokenizer(texts).input_ids
    alone = [llm.embed(t, use_tqdm=False)[0] for t in texts]
    for out, ref in zip(outs, alone):
        assert torch.allclose(torch.tensor(out.outputs.embedding), torch.tensor(ref.outputs.embedding), atol=1e-6)
    assert len({o.request_id for o in outs}) == len(texts)


def test_a_step_stays_in_flight_while_another_follows(bert_path):
    llm = LLM(bert_path, runner="pooling", max_num_seqs=1)
    engine = llm.llm_engine
    prompts = engine.prepare_prompts(sentences(3), pooling=True)
    for i, p in enumerate(prompts):
        engine.add_pooling_request(str(i), p, PoolingParams(task="embed"))
    assert engine.step() == []  # the first step is queued, its outputs come with the next
    assert engine.has_unfinished_requests()
    assert [o.request_id for o in engine.step()] == ["0"]  # "1" is in flight now
    engine.abort_request("1")
    assert [o.request_id for o in engine.step()] == ["2"]  # the last step is collected at once
    assert not engine.has_unfinished_requests() and not engine.parents and not engine.requests


def test_a_call_prepares_its_prompts_in_chunks_while_steps_run(bert_path, monkeypatch):
    from kiln.runtime import llm as llm_module

    monkeypatch.setattr(llm_module, "PREPARE_CHUNK", 4)
    llm = LLM(bert_path, runner="pooling")
    engine = llm.llm_engine
    prepares, steps = [], []
    prepare, step = engine.prepare_prompts, engine.step
    monkeypatch.setattr(engine, "prepare_prompts", lambda chunk, **kw: prepares.append(
        (len(chunk), threading.current_thread().name)) or prepare(chunk, **kw))
    monkeypatch.setattr(engine, "step", lambda **kw: steps.append(
        (engine._pooling_in_flight is not None, kw["more_coming"])) or step(**kw))
    texts = sentences(10, seed=3)
    outs = llm.embed(texts, use_tqdm=False)
    # chunks of 4 prepared on a worker thread, the main thread stepping meanwhile; each step but
    # the last stays in flight while the next chunk is queued
    assert [n for n, _ in prepares] == [4, 4, 2] and all(t.startswith("kiln-prepare") for _, t in prepares)
    assert steps == [(False, True), (True, True), (True, False)]
    alone = llm.embed(texts[7], use_tqdm=False)[0]
    assert torch.allclose(outs[7].outputs.data, alone.outputs.data, atol=1e-6)
    assert [o.prompt_token_ids for o in outs] == llm.get_tokenizer()(texts).input_ids
    # vLLM's list of floats, made from the kept tensor when read
    first = outs[0].outputs
    assert first.hidden_size == 32 and first.embedding == first.data.tolist()
    assert first == EmbeddingOutput(first.data.tolist()) and first != EmbeddingOutput([0.0] * 32)
    # a bad prompt in a later chunk: the call raises, and what the earlier chunks queued is gone
    with pytest.raises(ValueError):
        llm.embed(texts[:9] + [" ".join(WORDS * 10)], use_tqdm=False)  # over the 64 positions
    assert not engine.has_unfinished_requests() and not engine.parents and engine._pooling_in_flight is None
    assert torch.allclose(llm.embed(texts[7], use_tqdm=False)[0].outputs.data, alone.outputs.data, atol=1e-6)


def test_batched_tokenization_gives_the_tokenizers_ids(bert_path):
    llm = LLM(bert_path, runner="pooling")
    engine, tokenizer = llm.llm_engine, llm.get_tokenizer()
    texts = sentences(10, seed=1)
    assert engine._encode_texts(texts, None) == tokenizer(texts).input_ids
    assert engine._encode_texts(texts, 5) == tokenizer(texts, truncation=True, max_length=5).input_ids
    prepared = engine.prepare_prompts(texts, pooling=True)
    assert all(isinstance(p, PreparedPrompt) and p.token_array.tolist() == p["prompt_token_ids"] for p in prepared)
    # a prepared prompt longer than the request's truncation is truncated again
    long = max(prepared, key=lambda p: len(p["prompt_token_ids"]))
    engine.add_pooling_request("t", long, PoolingParams(task="embed", truncate_prompt_tokens=3))
    out = [o for o in engine.step() if o.request_id == "t"][0]
    assert out.prompt_token_ids == long["prompt_token_ids"][:3]


def test_mixed_options_in_one_step(bert_path):
    llm = LLM(bert_path, runner="pooling")
    texts = sentences(6, seed=2)
    options = [PoolingParams(), PoolingParams(dimensions=8), PoolingParams(normalize=False)] * 2
    outs = llm.embed(texts, options, use_tqdm=False)
    for text, p, out in zip(texts, options, outs):
        ref = llm.embed(text, p, use_tqdm=False)[0].outputs.embedding
        assert len(out.outputs.embedding) == len(ref) == (8 if p.dimensions else 32)
        assert torch.allclose(torch.tensor(out.outputs.embedding), torch.tensor(ref), atol=1e-6)
