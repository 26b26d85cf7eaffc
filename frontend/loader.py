"""Weight loading: build the model on the meta device, then fill each parameter from the
checkpoint's safetensors (memory-mapped, one tensor at a time) or `.bin` files."""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from kiln.frontend.quantization import attach_scales, is_quantized_tensor


def checkpoint_files(path: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        files = sorted(f for f in glob.glob(os.path.join(path, "*.bin")) if not f.endswith("training_args.bin"))
    if not files:
        raise FileNotFoundError(f"no weights (*.safetensors or *.bin) in model directory {path!r}")
    return files


def iterate_weights(path: str, progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every checkpoint weight, one at a time: safetensors are memory-mapped and
    each tensor read when asked for; pickled `.bin` files load only with `weights_only=True`."""
    from safetensors import safe_open

    files = checkpoint_files(path)
    safetensors = files[0].endswith(".safetensors")
    total = None
    if safetensors:  # headers only: cheap, and gives the bar its length
        total = 0
        for file in files:
            with safe_open(file, framework="pt") as f:
                total += len(f.keys())
    with tqdm(total=total, desc="Loading weights", unit="tensor", disable=not progress) as bar:
        for file in files:
            if safetensors:
                with safe_open(file, framework="pt") as f:
                    for name in f.keys():
                        yield name, f.get_tensor(name)
                        bar.update(1)
            else:
                for name, tensor in torch.load(file, map_location="cpu", weights_only=True, mmap=True).items():
                    yield name, tensor
                    bar.update(1)


# KV-cache scales of fp8 checkpoints: compressed-tensors / modelopt name them
# `model.layers.N.self_attn.k_scale` / `v_scale` (older ones one `kv_scale` for both), or
# `model.layers.N.self_attn.k_proj.output_scale` / `v_proj.output_scale`.
_KV_SCALE = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.(?:attn\.)?(?:(k|v|kv)_scale|(k|v)_proj\.output_scale)$")


def split_kv_scales(weights: Iterator[tuple[str, torch.Tensor]],
                    kv_scales: dict[tuple[int, str], float]) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass every weight through except the KV-cache scales, which go into kv_scales[(layer, "k" or
    "v")] as floats (the runner's fp8 cache uses them; with an "auto" cache they are unused). A scale
    with more than one element (per head) becomes its max, which never saturates a head's values."""
    for name, tensor in weights:
        match = _KV_SCALE.search(name)
        if match is None:
            yield name, tensor
            continue
        which = match.group(2) or match.group(3)
        for kind in ("k", "v") if which == "kv" else (which,):
            kv_scales[(int(match.group(1)), kind)] = float(tensor.float().max())


def read_kv_scales(path: str, kv_scales: dict[tuple[int, str], float]) -> None:
    """The KV-cache scales of a checkpoint whose weights another loader reads (the Transformers
    backend's): the same names and values as split_kv_scales, read from the safetensors headers and
    the matching tensors only. (`.bin` checkpoints: none read.)"""
    from safetensors import safe_open

    for file in checkpoint_files(path):
        if not file.endswith(".safetensors"):
            return
        with safe_open(file, framework="pt") as f:
            scales = ((name, f.get_tensor(name)) for name in f.keys() if _KV_SCALE.search(name))
            for _ in split_kv_scales(scales, kv_scales):
                pass


def load_model(model_cls: type[nn.Module], config, architecture: str, dtype: torch.dtype, device: torch.device,
               path: str, max_positions: int, progress: bool = True,
               kv_scales: dict[tuple[int, str], float] | None = None, quant=None, shard=None) -> nn.Module:
    """The model with the checkpoint's weights; its KV-cache scales, if any, go into `kv_scales`
    (see split_kv_scales) rather than into the model. `quant` (a CheckpointQuant) reads a
    pre-quantized checkpoint: 8-bit weights stay 8-bit, each with its scale (frontend/quantization.py).
    `shard` (a frontend.sharding.Shard) loads one tensor-parallel rank's part: the model is built from
    the rank-local config with its tensor-parallel modules, and each weight sliced as it is read."""
    with torch.device("meta"):
        model = model_cls(config if shard is None else shard.local_config(config), architecture, max_positions)
        if shard is not None:
            shard.prepare(model)
        model = model.to(dtype)
    model.to_empty(device=device)
    params = dict(model.named_parameters())
    # Name mapping is data on the model class: checkpoint prefixes to rewrite (a base model saved
    # under "bert." loaded into BertModel, say) and weights kiln has no use for (an MLM head, a
    # saved rope table); each matched as a substring of the checkpoint name.
    prefix_map = getattr(model, "weight_prefix_map", {})
    ignored = getattr(model, "ignored_weights", ())
    loaded: set[str] = set()
    quantized: set[str] = set()
    weight_scales: dict[str, torch.Tensor] = {}
    for name, tensor in split_kv_scales(iterate_weights(path, progress), {} if kv_scales is None else kv_scales):
        for old, new in prefix_map.items():
            if name.startswith(old):
                name = new + name[len(old):]
                break
        if any(s in name for s in ignored) or (name == "lm_head.weight" and name not in params):
            continue  # a tied head saved anyway, or a weight kiln does not use
        if quant is not None and name.endswith((".weight_scale", ".input_scale", ".weight_zero_point")):
            if name.endswith(".weight_zero_point"):
                raise ValueError(f"{name}: asymmetric quantization (zero points) is not supported")
            if name.endswith(".weight_scale"):  # (input scales: activations are quantized per token instead)
                # a per-channel scale is sliced with its weight's rows (colwise, vocab), whole otherwise
                weight_scales[name[:-len("_scale")]] = shard(name, tensor) if shard is not None else tensor
            continue
        param = params.get(name)
        if param is None:
            raise ValueError(f"checkpoint weight {name!r} has no place in {model_cls.__name__} ({architecture})")
        if shard is not None:
            tensor = shard(name, tensor)
        if param.shape != tensor.shape:
            raise ValueError(f"checkpoint weight {name!r} has shape {tuple(tensor.shape)}, model expects {tuple(param.shape)}")
        if quant is not None and is_quantized_tensor(tensor):
            param.requires_grad_(False)
            param.data = tensor.to(device)  # 8-bit as stored; the quantize pass reads it with its scale
            quantized.add(name)
        else:
            with torch.no_grad():
                param.copy_(tensor)
        loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"checkpoint at {path!r} lacks weights {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if quant is not None:
        attach_scales(params, quantized, weight_scales, quant)
    for module in model.modules():
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()
    lay_out_adjacent(model)
    return model.eval()


def lay_out_adjacent(model: nn.Module) -> None:
    """Put the weights of sibling linears (a model's `adjacent_weights`, e.g. q/k/v and gate/up)
    back to back in one storage, so that the merge_linears pass's single matmul reads them as one
    matrix with no copy. Same values; the parameters become views of the shared storage."""
    groups = getattr(model, "adjacent_weights", ())
    for module in model.modules():
        for names in groups:
            linears = [getattr(module, n, None) for n in names]
            if any(lin is None for lin in linears):
                continue
            for attr in ("weight", "bias"):
                params = [getattr(lin, attr, None) for lin in linears]
                if any(p is None for p in params):
                    continue
                merged = torch.cat([p.detach() for p in params], dim=0)
                start = 0
                for p in params:
                    p.data = merged[start:start + p.shape[0]]
                    start += p.shape[0]
