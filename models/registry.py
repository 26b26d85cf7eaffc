"""From HF `architectures` names to kiln model classes and the tasks they serve.

A generate model can also serve pooling through `convert` ("embed", "classify", "reward"): the
same decoder behind a pooling head (models/adapters.py), as vLLM converts models. Entries whose
`adapter` is set are such conversions under their own HF name (LlamaForSequenceClassification).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

POOLING_TASKS = ("embed", "classify", "score", "token_classify", "reward")
CONVERTS = ("embed", "classify", "reward")


@dataclass(frozen=True)
class ModelEntry:
    module: str  # kiln.models.<module>
    class_name: str
    tasks: tuple[str, ...]
    adapter: str | None = None  # "embed" | "classify" | "reward": the class behind a pooling adapter


_MODELS: dict[str, ModelEntry] = {
    "LlamaForCausalLM": ModelEntry("llama", "LlamaForCausalLM", ("generate",)),
    "MistralForCausalLM": ModelEntry("llama", "LlamaForCausalLM", ("generate",)),
    "Qwen2ForCausalLM": ModelEntry("llama", "LlamaForCausalLM", ("generate",)),
    "Qwen3ForCausalLM": ModelEntry("llama", "LlamaForCausalLM", ("generate",)),
    "FalconForCausalLM": ModelEntry("falcon", "FalconForCausalLM", ("generate",)),
    "BloomForCausalLM": ModelEntry("bloom", "BloomForCausalLM", ("generate",)),
    "BertModel": ModelEntry("bert", "BertModel", ("embed",)),
    "BertForSequenceClassification": ModelEntry("bert", "BertForSequenceClassification", ("classify", "score")),
    "BertForTokenClassification": ModelEntry("bert", "BertForTokenClassification", ("token_classify",)),
    "RobertaModel": ModelEntry("bert", "BertModel", ("embed",)),
    "RobertaForMaskedLM": ModelEntry("bert", "BertModel", ("embed",)),
    "RobertaForSequenceClassification": ModelEntry("bert", "RobertaForSequenceClassification", ("classify", "score")),
    "XLMRobertaModel": ModelEntry("bert", "BertModel", ("embed",)),
    "XLMRobertaForSequenceClassification": ModelEntry("bert", "RobertaForSequenceClassification", ("classify", "score")),
    "ModernBertModel": ModelEntry(module="modernbert", class_name="ModernBertModel", tasks=("embed",)),
    "ModernBertForSequenceClassification": ModelEntry(module="modernbert", class_name="ModernBertForSequenceClassification",
                                                      tasks=("classify", "score")),
    "ModernBertForTokenClassification": ModelEntry(module="modernbert", class_name="ModernBertForTokenClassification",
                                                   tasks=("token_classify",)),
    # the same families as pooling models
    **{f"{family}Model": ModelEntry("llama", "LlamaForCausalLM", ("embed",), "embed")
       for family in ("Llama", "Mistral", "Qwen2", "Qwen3")},
    **{f"{family}ForSequenceClassification": ModelEntry("llama", "LlamaForCausalLM", ("classify", "score"), "classify")
       for family in ("Llama", "Mistral", "Qwen2", "Qwen3")},
    "FalconForSequenceClassification": ModelEntry("falcon", "FalconForCausalLM", ("classify", "score"), "classify"),
    "BloomForSequenceClassification": ModelEntry("bloom", "BloomForCausalLM", ("classify", "score"), "classify"),
    "WhisperForConditionalGeneration": ModelEntry("whisper", "WhisperForConditionalGeneration", ("generate", "transcribe")),
    "Qwen2ForRewardModel": ModelEntry("llama", "Qwen2ForRewardModel", ("reward",)),
    "Qwen2ForProcessRewardModel": ModelEntry("llama", "Qwen2ForProcessRewardModel", ("reward",)),
}


def supported_architectures() -> dict[str, ModelEntry]:
    return dict(_MODELS)


def _load(entry: ModelEntry, adapter: str | None) -> type:
    cls = getattr(importlib.import_module(f"kiln.models.{entry.module}"), entry.class_name)
    if adapter is None:
        return cls
    from kiln.models import adapters

    return {"embed": adapters.as_embedding_model, "classify": adapters.as_seq_cls_model,
            "reward": adapters.as_reward_model}[adapter](cls)


def _tasks(tasks: tuple[str, ...]) -> tuple[str, ...]:
    return tasks + ("score",) if "embed" in tasks and "score" not in tasks else tasks  # score: cosine of embeddings


def resolve_architecture(architectures: list[str] | None, runner: str = "generate", convert: str = "auto",
                         model_impl: str = "auto", config=None) -> tuple[str, type, tuple[str, ...]]:
    """The first of `architectures` kiln serves for `runner` (and `convert`): its name, class and
    tasks. model_impl "kiln" takes only native implementations, "transformers" only the
    Transformers backend, "auto" a native one when there is one, else the backend. Otherwise a
    ValueError naming what was asked and listing what is supported."""
    if convert not in ("auto", "none") + CONVERTS:
        raise ValueError(f"convert={convert!r} is not supported; use 'auto', {', '.join(repr(c) for c in CONVERTS)}")
    if model_impl not in ("auto", "kiln", "transformers"):
        raise ValueError(f"model_impl={model_impl!r} is not supported; use 'auto', 'kiln' or 'transformers'")
    if model_impl != "transformers":
        found = _resolve_native(architectures, runner, convert)
        if found is not None:
            return found
    if model_impl != "kiln" and config is not None:
        from kiln.models import transformers_backend as backend

        for arch in architectures or []:
            if backend.serves(config, arch, runner):
                cls, tasks = backend.backend_class(arch, runner, convert, config)
                return arch, cls, tasks
    supported = ", ".join(f"{a} ({'/'.join(e.tasks)})" for a, e in sorted(_MODELS.items()))
    raise ValueError(
        f"Model architectures {architectures or []} are not supported for runner={runner!r}"
        f"{'' if runner == 'generate' else f', convert={convert!r}'}"
        f"{'' if model_impl == 'auto' else f', model_impl={model_impl!r}'}. Natively supported architectures: "
        f"{supported}; any other architecture that the installed transformers ships runs on the Transformers backend."
    )


def _resolve_native(architectures, runner: str, convert: str):
    for arch in architectures or []:
        entry = _MODELS.get(arch)
        if entry is None:
            continue
        pooling = [t for t in entry.tasks if t in POOLING_TASKS]
        if runner == "generate":
            if "generate" in entry.tasks:
                return arch, _load(entry, None), ("generate",)
        elif pooling and convert in ("auto", "none", *pooling):
            return arch, _load(entry, entry.adapter), _tasks(entry.tasks)
        elif "generate" in entry.tasks and convert != "none":
            target = "embed" if convert == "auto" else convert
            tasks = {"embed": ("embed",), "classify": ("classify", "score"), "reward": ("reward",)}[target]
            return arch, _load(entry, target), _tasks(tasks)
    return None
