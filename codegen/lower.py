"""From a rewritten kiln graph to something that runs.

`lower(graph, backend)`: "inductor" compiles the graph with Inductor (the regions between kiln
ops become generated kernels; each kiln op is a call into its registered implementation for the
device, except the few that are plain aten code everywhere, ATEN_OPS, which Inductor gets as that
code), "eager" runs the FX graph as it is (for tests and debugging).

The compile cache: Inductor keeps compiled artifacts in a directory; kiln points it at one folder
per (model config, dtype, passes, device, kiln version), so a second start of the same model finds
every graph already compiled.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable

import torch

from kiln.ir.graph import Graph


# kiln ops whose implementation is their plain-torch reference on every device: Inductor gets them
# as that aten op, fuses the elementwise work around them and calls the library kernels (cuBLAS)
# itself, instead of a call through the custom-op dispatcher per use (35-100 us of host time each
# on an H100 host: a quarter of a BERT-base step's launches). `linear` has a CUDA kernel only with
# compilation_config["float_gemv"], and is then kept (see `lower`'s `inline`).
ATEN_OPS = ("embedding", "linear", "layer_norm", "activation")

_ACTIVATIONS = {"gelu": (torch.ops.aten.gelu.default, {}), "gelu_tanh": (torch.ops.aten.gelu.default, {"approximate": "tanh"}),
                "relu": (torch.ops.aten.relu.default, {}), "silu": (torch.ops.aten.silu.default, {}),
                "tanh": (torch.ops.aten.tanh.default, {}), "sigmoid": (torch.ops.aten.sigmoid.default, {})}


def _as_aten(name: str, a: dict) -> tuple[Callable, tuple, dict]:
    """The aten call that is kiln op `name`'s reference, from the op's bound arguments."""
    if name == "linear":
        return torch.ops.aten.linear.default, (a["x"], a["weight"], a["bias"]), {}
    if name == "embedding":
        return torch.ops.aten.embedding.default, (a["weight"], a["input_ids"]), {}
    if name == "layer_norm":
        example = a["x"].meta.get("example_value", a["x"].meta.get("val"))
        width = example.shape[-1]
        return torch.ops.aten.layer_norm.default, (a["x"], [width], a["weight"], a["bias"], a["eps"]), {}
    if name == "activation":
        target, kwargs = _ACTIVATIONS[a["kind"]]
        return target, (a["x"],), kwargs
    raise KeyError(name)


def inline_aten_ops(gm: torch.fx.GraphModule, names: tuple[str, ...]) -> None:
    """Rewrite, in place, each call of the kiln ops in `names` as its reference aten call."""
    import inspect

    from kiln.ir import ops

    targets = {getattr(torch.ops.kiln, name).default: name for name in names}
    for node in gm.graph.nodes:
        name = targets.get(node.target) if node.op == "call_function" else None
        if name is None:
            continue
        bound = inspect.signature(getattr(ops, name).__wrapped__).bind(*node.args, **node.kwargs)
        bound.apply_defaults()
        node.target, node.args, node.kwargs = _as_aten(name, bound.arguments)
    gm.recompile()


def lower(graph: Graph, backend: str = "inductor", inline: tuple[str, ...] = ATEN_OPS) -> Callable:
    """A callable taking the traced graph's inputs. With Inductor, the kiln ops named in `inline`
    are lowered as their reference aten op."""
    if backend == "eager":
        return graph.gm.forward
    if backend == "inductor":
        from torch._inductor.compile_fx import compile_fx

        inline_aten_ops(graph.gm, inline)
        return compile_fx(graph.gm, graph.example_inputs)
    raise ValueError(f"compilation backend {backend!r} is not supported; use 'inductor' or 'eager'")


def compile_cache_dir(config: dict, dtype: torch.dtype, passes: list[str], device: str, version: str) -> str:
    """The cache folder for this model build; also made Inductor's cache directory."""
    key = json.dumps({"config": config, "dtype": str(dtype), "passes": passes, "device": device,
                      "kiln": version, "torch": torch.__version__}, sort_keys=True, default=str)
    root = os.environ.get("KILN_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "kiln")
    folder = os.path.join(root, "compile", hashlib.sha256(key.encode()).hexdigest()[:16])
    os.makedirs(folder, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
    return folder
