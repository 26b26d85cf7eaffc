"""What the benchmark scripts share: the device and dtype, a random Llama-shaped checkpoint, and
the lines every report starts and ends with. (benchmarks/ is not a package: each script puts this
folder on sys.path, which also works when `kiln bench` runs it with runpy.)"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import threading

import torch
import transformers

from kiln.runtime.demo import build_checkpoint, tiny_config, train_tokenizer


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


class GpuWatch:
    """The GPUs' SM clocks, temperatures and power, polled from nvidia-smi every half second while
    a measurement runs: a figure that drifts along a call can then be told from one taken at lower
    clocks. `summary()`: per GPU, SM MHz min-max, the hottest C, the most W ("" without nvidia-smi)."""

    def __init__(self):
        self.samples: list[list[tuple[float, ...]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,temperature.gpu,power.draw",
                                      "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
                self.samples.append([tuple(float(v) for v in line.split(",")) for line in out.stdout.splitlines()])
            except (OSError, ValueError, subprocess.TimeoutExpired):
                return
            self._stop.wait(0.5)

    def __enter__(self) -> "GpuWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> str:
        return gpu_summary(self.samples)


def gpu_summary(samples: list[list[tuple[float, ...]]]) -> str:
    """GpuWatch.summary of samples from one watch or several (their `samples` added up)."""
    if not samples:
        return ""
    per_gpu = list(zip(*samples))
    return " | ".join(f"gpu{i} {min(s[0] for s in g):.0f}-{max(s[0] for s in g):.0f} MHz "
                      f"{max(s[1] for s in g):.0f} C {max(s[2] for s in g):.0f} W" for i, g in enumerate(per_gpu))


def large_random_checkpoint(path: str, architecture: str = "LlamaForCausalLM", dtype: str = "bfloat16",
                            shard_bytes: int = 4 << 30, seed: int = 0, **config) -> str:
    """A random checkpoint too large to initialise through transformers in good time (an 8B shape:
    16 GB): the tensor names and shapes from a model on the meta device, the values drawn on the
    GPU (normal, std initializer_range; norms ones), written as sharded safetensors with an index."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    tokenizer = train_tokenizer()
    hf_config = tiny_config(architecture, **{"vocab_size": len(tokenizer), **config})
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in AutoModelForCausalLM.from_config(hf_config).state_dict().items()}
    if hf_config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    os.makedirs(path, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(device).manual_seed(seed)
    std, torch_dtype = hf_config.initializer_range, getattr(torch, dtype)
    shards, current, size = [], {}, 0
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            current[name] = torch.ones(shape, dtype=torch_dtype)
        else:
            current[name] = (torch.randn(shape, generator=generator, device=device) * std).to(torch_dtype).cpu()
        size += current[name].numel() * current[name].element_size()
        if size >= shard_bytes:
            shards.append(current)
            current, size = {}, 0
    if current:
        shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, filename))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    hf_config.torch_dtype = dtype
    hf_config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def report_syncs(fn, label: str) -> None:
    """Call fn() once with CUDA's sync debug mode on, and print each distinct place (kiln's frames
    of the Python stack) where the host waited for the device, with how often: a diagnostic for
    waits that keep the host from running ahead of the device."""
    import collections
    import traceback
    import warnings

    seen = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" not in str(message):
            return
        frames = [f for f in traceback.extract_stack()[:-1] if "/kiln/" in f.filename or "benchmarks" in f.filename]
        seen[" < ".join(f"{f.filename.rsplit('/', 2)[-2]}/{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}"
                        for f in reversed(frames[-4:]))] += 1

    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    print(f"host waits for the device in {label}: {sum(seen.values())}")
    for where, n in seen.most_common(12):
        print(f"  {n:6d}  {where}")
