"""Weight loading: build the model on the meta device, then fill each parameter from the
checkpoint's safetensors (memory-mapped, one tensor at a time) or `.bin` files."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm


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


def load_model(model_cls: type[nn.Module], config, architecture: str, dtype: torch.dtype, device: torch.device,
               path: str, max_positions: int, progress: bool = True) -> nn.Module:
    with torch.device("meta"):
        model = model_cls(config, architecture, max_positions).to(dtype)
    model.to_empty(device=device)
    params = dict(model.named_parameters())
    # Name mapping is data on the model class: checkpoint prefixes to rewrite (a base model saved
    # under "bert." loaded into BertModel, say) and weights kiln has no use for (an MLM head, a
    # saved rope table); each matched as a substring of the checkpoint name.
    prefix_map = getattr(model, "weight_prefix_map", {})
    ignored = getattr(model, "ignored_weights", ())
    loaded: set[str] = set()
    for name, tensor in iterate_weights(path, progress):
        for old, new in prefix_map.items():
            if name.startswith(old):
                name = new + name[len(old):]
                break
        if any(s in name for s in ignored) or (name == "lm_head.weight" and name not in params):
            continue  # a tied head saved anyway, or a weight kiln does not use
        param = params.get(name)
        if param is None:
            raise ValueError(f"checkpoint weight {name!r} has no place in {model_cls.__name__} ({architecture})")
        if param.shape != tensor.shape:
            raise ValueError(f"checkpoint weight {name!r} has shape {tuple(tensor.shape)}, model expects {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(tensor)
        loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"checkpoint at {path!r} lacks weights {missing[:5]}{' ...' if len(missing) > 5 else ''}")
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
