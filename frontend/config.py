"""Where a model lives and what its config says: local directory or hub id, `hf_overrides`, dtype."""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import torch
from transformers import AutoConfig, PretrainedConfig

# What a model directory needs from the hub: config, weights, tokenizer files. Never pickles
# when safetensors exist (the loader reads .bin only with weights_only=True anyway).
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]


def resolve_model_path(model: str, revision: str | None = None) -> str:
    """A local directory as is; otherwise a hub id fetched (or found in the cache) through
    huggingface_hub. Offline or unreachable, a clear OSError instead of a hang."""
    if os.path.isdir(model):
        return model
    if os.path.isabs(model) or model.startswith(".") or model.count("/") > 1 or os.path.exists(model):
        raise FileNotFoundError(f"model directory {model!r} does not exist")
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HfHubHTTPError

    try:
        path = snapshot_download(model, revision=revision, allow_patterns=_HUB_PATTERNS, etag_timeout=10)
    except (HfHubHTTPError, OSError, ValueError) as e:  # includes offline mode and connection errors
        raise OSError(
            f"model {model!r} is not a local directory and could not be fetched from the Hugging Face hub "
            f"({type(e).__name__}: {e}). Pass a local checkpoint directory, or download it first."
        ) from e
    if not any(f.endswith((".safetensors", ".bin")) for f in os.listdir(path)):
        # The hub repo ships only pickled weights: fetch those too (loaded with weights_only=True).
        path = snapshot_download(model, revision=revision, allow_patterns=_HUB_PATTERNS + ["*.bin"], etag_timeout=10)
    return path


def load_hf_config(
    path: str,
    hf_overrides: dict[str, Any] | Callable[[PretrainedConfig], PretrainedConfig] | None = None,
    trust_remote_code: bool = False,
) -> PretrainedConfig:
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"no config.json in model directory {path!r}")
    try:
        with open(config_file) as f:
            json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"config.json in {path!r} is not valid JSON: {e}") from e
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as e:
        if "trust_remote_code" in str(e) and not trust_remote_code:
            raise ValueError(
                f"the model at {path!r} needs its own code (auto_map in config.json); "
                "pass trust_remote_code=True if you trust it"
            ) from e
        raise ValueError(f"cannot read config.json in {path!r}: {e}") from e
    if callable(hf_overrides):
        config = hf_overrides(config)
    elif hf_overrides:
        for key, value in hf_overrides.items():
            if isinstance(value, dict) and isinstance(getattr(config, key, None), dict):
                value = {**getattr(config, key), **value}
            setattr(config, key, value)
    return config


_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16}


def resolve_dtype(dtype: str | torch.dtype, config: PretrainedConfig) -> torch.dtype:
    """'auto' takes the checkpoint's dtype (float32 when it names none)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; use float32, bfloat16 or float16")
        return dtype
    if dtype == "auto":
        found = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(found, str):
            found = _DTYPES.get(found)
        return found if found in _DTYPES.values() else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use 'auto', {', '.join(repr(d) for d in _DTYPES)}")
    return _DTYPES[dtype]


_ST_POOLING_MODES = {"pooling_mode_cls_token": "CLS", "pooling_mode_mean_tokens": "MEAN",
                     "pooling_mode_lasttoken": "LAST"}


def sentence_transformers_pooling(path: str) -> dict:
    """What a sentence-transformers checkpoint says: {"pooling_type", "normalize", "max_seq_length"}
    from `modules.json`, its Pooling module's config and `sentence_bert_config.json` (empty when
    the checkpoint has none)."""
    modules_file = os.path.join(path, "modules.json")
    if not os.path.isfile(modules_file):
        return {}
    with open(modules_file) as f:
        modules = json.load(f)
    found: dict = {"normalize": any(m.get("type", "").endswith(".Normalize") for m in modules)}
    bert_config = os.path.join(path, "sentence_bert_config.json")
    if os.path.isfile(bert_config):
        with open(bert_config) as f:
            max_seq_length = json.load(f).get("max_seq_length")
        if max_seq_length:
            found["max_seq_length"] = int(max_seq_length)
    for module in modules:
        if not module.get("type", "").endswith(".Pooling"):
            continue
        pooling_file = os.path.join(path, module.get("path", ""), "config.json")
        if not os.path.isfile(pooling_file):
            continue
        with open(pooling_file) as f:
            pooling = json.load(f)
        modes = [kind for key, kind in _ST_POOLING_MODES.items() if pooling.get(key)]
        unsupported = [k for k, v in pooling.items() if k.startswith("pooling_mode_") and v and k not in _ST_POOLING_MODES]
        if unsupported or len(modes) > 1:
            raise ValueError(f"sentence-transformers pooling {unsupported or modes} in {pooling_file} is not supported; "
                             "pass pooler_config={'pooling_type': ...} to choose one of CLS, MEAN, LAST")
        if modes:
            found["pooling_type"] = modes[0]
    return found
