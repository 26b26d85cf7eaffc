"""Data parallelism on CPU: two replica processes behind one LLM return every request once, in
order, with the tokens one engine gives; a dead replica is a clear error, not a hang."""

from __future__ import annotations

import os
import signal

import pytest

from kiln import LLM, SamplingParams

PROMPTS = [f"Once upon a time there were {i} small engines" + " and more" * (i % 4) for i in range(7)]


def model_class_name(model) -> str:  # module-level: apply_model's function must pickle across processes
    return type(model).__name__


@pytest.fixture(scope="module")
def pool(llama_path):
    llm = LLM(llama_path, data_parallel_size=2, max_model_len=128)
    yield llm
    llm.shutdown()


def test_every_request_once_in_order_with_single_engine_tokens(pool, llama_path):
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    single = LLM(llama_path, max_model_len=128).generate(PROMPTS, params, use_tqdm=False)
    outs = pool.generate(PROMPTS, params)
    assert [o.prompt for o in outs] == PROMPTS
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in single]
    assert len({o.request_id for o in outs}) == len(PROMPTS)
    per_prompt = [SamplingParams(temperature=0.0, max_tokens=2 + i, ignore_eos=True) for i in range(len(PROMPTS))]
    assert [len(o.outputs[0].token_ids) for o in pool.generate(PROMPTS, per_prompt)] == [2 + i for i in range(7)]
    assert pool.apply_model(model_class_name) == ["LlamaForCausalLM", "LlamaForCausalLM"]
    tokenizer = pool.get_tokenizer()
    assert tokenizer is pool.get_tokenizer()  # (asked of replica 0 once)
    assert tokenizer(PROMPTS[0])["input_ids"] == single[0].prompt_token_ids


def test_bad_input_raises_and_the_pool_keeps_serving(pool):
    with pytest.raises(ValueError, match="empty"):
        pool.generate(["fine", {"prompt_token_ids": []}], SamplingParams(max_tokens=2))
    assert len(pool.generate(PROMPTS[:3], SamplingParams(max_tokens=2))) == 3


def test_a_dead_replica_is_a_clear_error(llama_path):
    llm = LLM(llama_path, data_parallel_size=2, max_model_len=64)
    os.kill(llm._replicas.replicas[1][1].pid, signal.SIGKILL)
    with pytest.raises(RuntimeError, match="replica 1"):
        llm.generate(PROMPTS, SamplingParams(max_tokens=2))
    assert not llm._replicas.replicas  # shut down, no process left behind


def test_replicas_of_tensor_parallel_engines(llama_path):
    """data_parallel_size=2 x tensor_parallel_size=2 (gloo on CPU): each replica is rank 0 of its own
    two-rank group, starting its worker itself; every request once, in order, with one engine's
    tokens; shutdown stops the replicas and, through them, their workers."""
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    single = LLM(llama_path, max_model_len=128).generate(PROMPTS, params, use_tqdm=False)
    llm = LLM(llama_path, data_parallel_size=2, tensor_parallel_size=2, max_model_len=128)
    try:
        outs = llm.generate(PROMPTS, params)
        assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in single]
        assert llm.apply_model(model_class_name) == ["LlamaForCausalLM", "LlamaForCausalLM"]
        replicas = [process for _, process in llm._replicas.replicas]
        assert not any(p.daemon for p in replicas)  # (they start processes of their own)
    finally:
        llm.shutdown()
    assert not any(p.is_alive() for p in replicas)


def test_score_and_transcribe_spread_over_replicas(llama_path, tmp_path):
    """score's pairs and transcribe's clips go to the replicas like prompts: the results are one
    engine's, in order (clips decoded in the caller first, so bad audio fails before any replica works)."""
    import numpy as np

    from kiln.runtime.demo import build_whisper_checkpoint

    docs = PROMPTS[1:6]
    single = LLM(llama_path, runner="pooling", max_model_len=128).score(PROMPTS[0], docs, use_tqdm=False)
    llm = LLM(llama_path, runner="pooling", max_model_len=128, data_parallel_size=2)
    try:
        outs = llm.score(PROMPTS[0], docs)
        assert [o.outputs.score for o in outs] == pytest.approx([o.outputs.score for o in single], abs=1e-6)
        assert [o.request_id for o in outs] == [str(i) for i in range(len(docs))]
        with pytest.raises(ValueError, match="same length"):
            llm.score(["a", "b"], ["c", "d", "e"])
    finally:
        llm.shutdown()

    whisper = build_whisper_checkpoint(str(tmp_path / "whisper"), max_target_positions=24)
    t = np.arange(16000 * 2) / 16000
    clips = [np.sin(2 * np.pi * f * t[:16000 * (1 + i % 2)]).astype(np.float32) for i, f in enumerate((220, 440, 880))]
    single = LLM(whisper).transcribe(clips, language="en", sample_rate=16000, use_tqdm=False)
    llm = LLM(whisper, data_parallel_size=2)
    try:
        outs = llm.transcribe(clips, language="en", sample_rate=16000)
        assert all(o.token_ids[0] for o in single)  # (something to compare)
        assert [o.token_ids for o in outs] == [o.token_ids for o in single]
        assert [o.duration for o in outs] == [o.duration for o in single]
        assert llm.transcribe(clips[0], language="en", sample_rate=16000).text == single[0].text
        with pytest.raises(ValueError, match="sample_rate"):
            llm.transcribe(clips[0], language="en")
    finally:
        llm.shutdown()
