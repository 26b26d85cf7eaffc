"""From a rewritten kiln graph to something that runs.

`lower(graph, backend)`: "inductor" compiles the graph with Inductor (the regions between kiln
ops become generated kernels; each kiln op is a call into its registered implementation for the
device), "eager" runs the FX graph as it is (for tests and debugging).

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

from kiln.ir.graph import Graph, is_kiln_op


def lower(graph: Graph, backend: str = "inductor") -> Callable:
    """A callable taking the traced graph's inputs."""
    if backend == "eager":
        return graph.gm.forward
    if backend == "inductor":
        from torch._inductor.compile_fx import compile_fx

        _register_fallbacks(graph)
        return compile_fx(graph.gm, graph.example_inputs)
    raise ValueError(f"compilation backend {backend!r} is not supported; use 'inductor' or 'eager'")


def _register_fallbacks(graph: Graph) -> None:
    """Make each kiln op of the graph an Inductor fallback kernel before Inductor sees it, with the
    layout constraint Inductor would give it. Inductor makes that fallback itself on first sight of
    an op, but torch 2.11 formats the op's arguments for a log line as it does so, whether or not the
    line is logged (torch 2.13 defers it), and the IR of an argument prints everything it depends
    on, repeated along every path: an op first seen at the end of a deep graph (the final norm of a
    16-layer Llama, once the norms before it fused into the gemvs) printed for minutes."""
    from torch._inductor.lowering import lowerings, make_fallback, tag_to_layout_constraint
    from torch._library.utils import get_layout_constraint_tag

    for node in graph.graph.nodes:
        if is_kiln_op(node) and node.target not in lowerings:
            constraint = tag_to_layout_constraint(get_layout_constraint_tag(node.target, with_default=True))
            make_fallback(node.target, layout_constraint=constraint, warn=False)


def compile_cache_dir(config: dict, dtype: torch.dtype, passes: list[str], device: str, version: str) -> str:
    """The cache folder for this model build; also made Inductor's cache directory."""
    key = json.dumps({"config": config, "dtype": str(dtype), "passes": passes, "device": device,
                      "kiln": version, "torch": torch.__version__}, sort_keys=True, default=str)
    root = os.environ.get("KILN_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "kiln")
    folder = os.path.join(root, "compile", hashlib.sha256(key.encode()).hexdigest()[:16])
    os.makedirs(folder, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
    return folder
