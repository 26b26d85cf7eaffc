"""What the benchmark scripts share: the device and dtype, a random Llama-shaped checkpoint, and
the lines every report starts and ends with. (benchmarks/ is not a package: each script puts this
folder on sys.path, which also works when `kiln bench` runs it with runpy.)"""

from __future__ import annotations

import tempfile

import torch
import transformers

from kiln.runtime.demo import build_checkpoint


def device_and_dtype(device: str = "auto", dtype: str | None = None) -> tuple[torch.device, str]:
    """"auto" picks CUDA when there is one; the dtype defaults to bfloat16 on CUDA, float32 on CPU."""
    chosen = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    return chosen, dtype or ("bfloat16" if chosen.type == "cuda" else "float32")


def random_llama(args, dtype: str, max_positions: int, **overrides) -> tuple[str, tempfile.TemporaryDirectory | None]:
    """args.model, or a random Llama of the shape in args (hidden_size, num_layers, num_heads,
    num_kv_heads, intermediate_size, seed) built in a temp dir (returned, to clean up)."""
    if args.model is not None:
        return args.model, None
    tmp = tempfile.TemporaryDirectory(prefix="kiln-bench-")
    path = build_checkpoint(
        tmp.name, "LlamaForCausalLM", seed=args.seed, dtype=dtype, hidden_size=args.hidden_size,
        num_hidden_layers=args.num_layers, num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads, intermediate_size=args.intermediate_size,
        max_position_embeddings=max(512, max_positions), **overrides)
    return path, tmp


def header(device: torch.device, dtype: str) -> str:
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    return f"device {device} ({where}) | torch {torch.__version__} | transformers {transformers.__version__} | dtype {dtype}"


def runs(times: dict[str, list[float]], digits: int = 2) -> str:
    """Every timed run of every side, so a noisy median can be seen as one."""
    return "runs s: " + ", ".join(f"{name} " + " ".join(f"{t:.{digits}f}" for t in ts) for name, ts in times.items())
