"""Model resolution and weight loading: hub ids offline, .bin checkpoints, hf_overrides, bad weights."""

from __future__ import annotations

import shutil
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from kiln import LLM, SamplingParams
from kiln.frontend import load_hf_config, resolve_model_path


def greedy_tokens(llm) -> list[int]:
    out = llm.generate("Hello, my name is", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    return out[0].outputs[0].token_ids


def test_hub_id_offline_is_a_clear_error_not_a_hang(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    start = time.monotonic()
    with pytest.raises(OSError, match="could not be fetched from the Hugging Face hub"):
        resolve_model_path("some-org/some-model")
    assert time.monotonic() - start < 30


def test_bin_checkpoint_loads_with_weights_only(llama_path, tmp_path):
    path = shutil.copytree(llama_path, tmp_path / "m")
    torch.save(load_file(path / "model.safetensors"), path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    assert greedy_tokens(LLM(str(path))) == greedy_tokens(LLM(llama_path))


def test_sharded_safetensors_load(llama_path, tmp_path):
    path = shutil.copytree(llama_path, tmp_path / "m")
    weights = load_file(path / "model.safetensors")
    names = sorted(weights)
    (path / "model.safetensors").unlink()
    save_file({n: weights[n] for n in names[::2]}, path / "model-00001-of-00002.safetensors")
    save_file({n: weights[n] for n in names[1::2]}, path / "model-00002-of-00002.safetensors")
    assert greedy_tokens(LLM(str(path))) == greedy_tokens(LLM(llama_path))


def test_wrong_shape_and_unknown_weight(llama_path, tmp_path):
    path = shutil.copytree(llama_path, tmp_path / "m")
    weights = load_file(path / "model.safetensors")
    weights["model.norm.weight"] = torch.ones(3)
    save_file(weights, path / "model.safetensors")
    with pytest.raises(ValueError, match="model.norm.weight.*shape"):
        LLM(str(path))
    weights = load_file(llama_path + "/model.safetensors")
    weights["model.extra.weight"] = torch.ones(3)
    save_file(weights, path / "model.safetensors")
    with pytest.raises(ValueError, match="model.extra.weight"):
        LLM(str(path))
    weights = load_file(llama_path + "/model.safetensors")
    del weights["model.norm.weight"]
    save_file(weights, path / "model.safetensors")
    with pytest.raises(ValueError, match="lacks weights.*model.norm.weight"):
        LLM(str(path))


def test_hf_overrides_dict_and_callable(llama_path):
    config = load_hf_config(llama_path, {"rms_norm_eps": 0.5, "rope_parameters": {"rope_theta": 77.0}})
    assert config.rms_norm_eps == 0.5
    assert config.rope_parameters["rope_theta"] == 77.0 and "rope_type" in config.rope_parameters

    def loosen(c):
        c.rms_norm_eps = 0.25
        return c

    llm = LLM(llama_path, hf_overrides=loosen)
    assert llm.apply_model(lambda m: m.model.norm.eps) == [0.25]
