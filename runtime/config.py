"""The engine's configuration: one dataclass, the `LLM` arguments vLLM users already pass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

_RUNNERS = ("generate", "pooling")
# vLLM's names: "auto" keeps the KV cache in the model dtype; "fp8" (= "fp8_e4m3") stores it as
# torch.float8_e4m3fn with a per-layer scale for keys and one for values
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")
# how tensor-parallel workers are started: "mp" processes on this host, "ray" actors on a Ray cluster
EXECUTOR_BACKENDS = ("mp", "ray")


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
    kv_cache_dtype: str = "auto"  # one of KV_CACHE_DTYPES
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    # None: compile on CUDA, run eager on CPU (where compiling costs more than it saves for small
    # models); False compiles everywhere; True never compiles
    enforce_eager: bool | None = None
    compilation_config: dict | None = None  # {"passes": [...], "backend": "inductor"|"eager", "dump_ir": dir}
    # "int8" | "fp8" (W8A8) | "int8_weight_only" | "fp8_weight_only": the quantize pass rewrites
    # every linear; None keeps the checkpoint's own (a pre-quantized checkpoint is read as it is)
    quantization: str | None = None
    # launch each decode step before reading back the previous one's tokens, so the host's work
    # (scheduling, inputs, detokenizing) overlaps the device's; applies while every live request
    # samples without host-side state (no logprobs, penalties or min_tokens), else steps run in turn.
    # None: on for a CUDA device (as vLLM has it), off on CPU, where host and "device" are one
    async_scheduling: bool | None = None
    hf_overrides: dict | Callable | None = None
    trust_remote_code: bool = False
    skip_tokenizer_init: bool = False
    device: str = "auto"
    # N > 1: the model split over N ranks, this process and N - 1 workers (runtime/tensor_parallel.py)
    tensor_parallel_size: int = 1
    distributed_executor_backend: str = "mp"  # one of EXECUTOR_BACKENDS
    # vLLM's switch: True keeps every all-reduce on the backend's collective (NCCL) instead of kiln's
    # own two-rank kernel over NVLink, the default at TP=2 where the GPUs reach each other's memory
    disable_custom_all_reduce: bool = False

    def __post_init__(self) -> None:
        if self.runner not in _RUNNERS:
            raise ValueError(f"runner={self.runner!r} is not supported; supported: {', '.join(_RUNNERS)}")
        for name in ("max_num_seqs", "block_size", "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_model_len", "max_num_batched_tokens", "kv_cache_memory", "num_gpu_blocks_override"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.quantization is not None:
            from kiln.ir.quant_ops import SCHEMES

            if self.quantization not in SCHEMES:
                raise ValueError(f"quantization={self.quantization!r} is not supported; supported: "
                                 f"{', '.join(SCHEMES)}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype={self.kv_cache_dtype!r} is not supported; supported: "
                             f"{', '.join(KV_CACHE_DTYPES)}")
        if self.distributed_executor_backend not in EXECUTOR_BACKENDS:
            raise ValueError(f"distributed_executor_backend={self.distributed_executor_backend!r} is not supported; "
                             f"supported: {', '.join(map(repr, EXECUTOR_BACKENDS))}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
