"""The engine's configuration: one dataclass, the `LLM` arguments vLLM users already pass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

_RUNNERS = ("generate", "pooling")


@dataclass
class EngineConfig:
    model: str
    tokenizer: str | None = None
    revision: str | None = None
    runner: str = "generate"
    convert: str = "auto"
    model_impl: str = "auto"  # "kiln" (native), "transformers" (the Transformers backend) or "auto"
    pooler_config: Any = None  # PoolerConfig or dict
    dtype: Any = "auto"
    seed: int = 0
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes; default on CPU: 1 GiB
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    # None: compile on CUDA, run eager on CPU (where compiling costs more than it saves for small
    # models); False compiles everywhere; True never compiles
    enforce_eager: bool | None = None
    compilation_config: dict | None = None  # {"passes": [...], "backend": "inductor"|"eager", "dump_ir": dir}
    hf_overrides: dict | Callable | None = None
    trust_remote_code: bool = False
    skip_tokenizer_init: bool = False
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.runner not in _RUNNERS:
            raise ValueError(f"runner={self.runner!r} is not supported; supported: {', '.join(_RUNNERS)}")
        for name in ("max_num_seqs", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_model_len", "max_num_batched_tokens", "kv_cache_memory", "num_gpu_blocks_override"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
