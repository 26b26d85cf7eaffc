"""Bad input gets a clear error naming the problem, and the engine serves the next request."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from kiln import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(llama_path):
    return LLM(llama_path, max_model_len=64)


def ok(llm):
    out = llm.generate("Hello, my name is", SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) >= 1 and out.finished
    assert llm.llm_engine.block_manager.num_free_blocks == llm.llm_engine.block_manager.num_blocks


@pytest.mark.parametrize("prompt, match", [
    ({"prompt_token_ids": list(range(10, 80))}, "max_model_len=64"),
    ({"prompt_token_ids": [5, 10**6]}, "outside the vocabulary"),
    ({"prompt_token_ids": [5, -1]}, "outside the vocabulary"),
    ({"prompt_token_ids": []}, "empty"),
    ("", "empty"),
    ({"prompt_token_ids": ["a"]}, "list of integers"),
    (42, "must be a string"),
    ({"text": "hi"}, "'prompt' or 'prompt_token_ids'"),
])
def test_bad_prompts(llm, prompt, match):
    with pytest.raises(ValueError, match=match):
        llm.generate(prompt, SamplingParams(max_tokens=2), use_tqdm=False)
    ok(llm)


def test_one_bad_prompt_in_a_batch_queues_nothing(llm):
    with pytest.raises(ValueError, match="empty"):
        llm.generate(["fine", {"prompt_token_ids": []}], SamplingParams(max_tokens=2), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    ok(llm)


@pytest.mark.parametrize("kwargs, field", [
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": -3}, "max_tokens"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"temperature": -1.0}, "temperature"),
    ({"n": 0}, "n"), ({"top_k": -5}, "top_k"), ({"min_p": 2.0}, "min_p"),
    ({"stop": [""]}, "stop"), ({"logprobs": -1}, "logprobs"),
])
def test_bad_sampling_params(llm, kwargs, field):
    with pytest.raises(ValueError, match=f"SamplingParams.{field} "):
        SamplingParams(**kwargs)
    ok(llm)


@pytest.mark.parametrize("kwargs, field", [
    ({"stop_token_ids": [10**6]}, "stop_token_ids"), ({"logprobs": 10**6}, "logprobs"),
    ({"prompt_logprobs": 10**6}, "prompt_logprobs"),
])
def test_vocabulary_bounded_params(llm, kwargs, field):
    with pytest.raises(ValueError, match=field):
        llm.generate("hi", SamplingParams(**kwargs), use_tqdm=False)
    ok(llm)


def test_unknown_architecture_names_it_and_lists_supported(llama_path, tmp_path):
    path = shutil.copytree(llama_path, tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["FancyNewForCausalLM"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"FancyNewForCausalLM.*Natively supported architectures: .*LlamaForCausalLM"):
        LLM(str(path))


def test_missing_weights(llama_path, tmp_path):
    path = shutil.copytree(llama_path, tmp_path / "m")
    os.remove(path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no weights"):
        LLM(str(path))


def test_corrupt_config(llama_path, tmp_path):
    path = shutil.copytree(llama_path, tmp_path / "m")
    (path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json .* not valid JSON"):
        LLM(str(path))


def test_missing_model_directory():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLM("/no/such/model/dir")


def test_max_model_len_beyond_positions(llama_path):
    with pytest.raises(ValueError, match="max_position_embeddings"):
        LLM(llama_path, max_model_len=10**6)


def test_unsupported_dtype(llama_path):
    with pytest.raises(ValueError, match="dtype"):
        LLM(llama_path, dtype="int3")
