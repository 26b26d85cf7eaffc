"""From HF `architectures` names to kiln model classes and the tasks they serve."""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelEntry:
    module: str  # kiln.models.<module>
    class_name: str
    tasks: tuple[str, ...]


_MODELS: dict[str, ModelEntry] = {
    "LlamaForCausalLM": ModelEntry("llama", "LlamaForCausalLM", ("generate",)),
    "MistralForCausalLM": ModelEntry("llama", "LlamaForCausalLM", ("generate",)),
    "Qwen2ForCausalLM": ModelEntry("llama", "LlamaForCausalLM", ("generate",)),
    "Qwen3ForCausalLM": ModelEntry("llama", "LlamaForCausalLM", ("generate",)),
}


def supported_architectures() -> dict[str, ModelEntry]:
    return dict(_MODELS)


def resolve_architecture(architectures: list[str] | None, runner: str = "generate") -> tuple[str, type]:
    """The first of `architectures` kiln serves for `runner`, and its class; else a ValueError
    naming what was asked and listing what is supported."""
    for arch in architectures or []:
        entry = _MODELS.get(arch)
        if entry is not None and runner in entry.tasks:
            module = importlib.import_module(f"kiln.models.{entry.module}")
            return arch, getattr(module, entry.class_name)
    supported = ", ".join(f"{a} ({'/'.join(e.tasks)})" for a, e in sorted(_MODELS.items()))
    raise ValueError(
        f"Model architectures {architectures or []} are not supported for runner={runner!r}. "
        f"Supported architectures: {supported}"
    )
