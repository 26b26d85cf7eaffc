"""Tracing: `torch.compile` of a model's forward with kiln's backend, the token dimension dynamic.

The backend receives each FX graph torch.compile captures, wraps it as kiln's IR (`Graph`),
verifies it against the op vocabulary, and hands it to `lower` — the passes and codegen, which the
runtime supplies (stages to the right of the frontend are not imported here). What `lower`
returns is what runs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from kiln.ir.graph import Graph
from kiln.ir.verify import VocabularyError, verify


_compiled = 0  # graphs compiled by any backend in this process


def graphs_compiled() -> int:
    """How many graphs kiln's backends have compiled in this process (the runtime freezes the
    garbage collector's heap again after a step that compiled: see engine.freeze_gc_heap)."""
    return _compiled


class KilnBackend:
    def __init__(self, lower: Callable[[Graph], Callable], strict: bool = True):
        self.lower = lower
        self.strict = strict  # native models must stay inside the vocabulary; HF models traced by the backend may not
        self.graphs: list[Graph] = []  # every graph seen, for inspection

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        global _compiled
        _compiled += 1
        graph = Graph(gm, example_inputs)
        if self.strict:
            verify(graph)
        self.graphs.append(graph)
        return self.lower(graph)


def trace(model: nn.Module, lower: Callable[[Graph], Callable], strict: bool = True,
          method: str = "forward") -> Callable:
    """The model's forward (or another method, as `compute_logits`), compiled through kiln's
    backend. The first call traces; sizes along the token dimension are symbolic, so batches of
    any size reuse the graph (for HF models through the backend, 1 is specialised once)."""
    backend = KilnBackend(lower, strict)
    # torch.compile caches per code object: every model instance of a class shares one budget of
    # recompiles (8 by default), and each instance compiles at least once (an HF model twice: one
    # token, and any number)
    config = torch._dynamo.config
    for name, floor in (("recompile_limit", 256), ("accumulated_recompile_limit", 4096)):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), floor))
    compiled = torch.compile(getattr(model, method), backend=backend, dynamic=True, fullgraph=strict)

    def forward(*args, **kwargs):
        if strict:
            # A native model's token dimension (dim 0 of its tensor arguments: ids, positions, hidden
            # states) is unbacked: no guard that it is >= 2, so one graph serves one token and
            # any number, compiled once instead of twice (kiln's models never branch on it; an HF
            # model might, so the backend's keep 1 specialised).
            for arg in args:
                if isinstance(arg, torch.Tensor) and arg.dim() > 0:
                    torch._dynamo.decorators.mark_unbacked(arg, 0)
        try:
            if not backend.graphs:
                # The model's Python floats (eps, scales) are constants: left unspecialized (the
                # default), Dynamo turns them into tensor inputs, fails to keep them so (they are
                # kiln ops' float arguments), and traces the whole model a second time with them
                # specialized: half the first compile (1.5 instead of 3.7 s, a 16-layer model on
                # CPU with a warm cache). Patched around the calls that trace only: the patch
                # costs ~65 us a call.
                with torch._dynamo.config.patch(specialize_float=True):
                    return compiled(*args, **kwargs)
            return compiled(*args, **kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as e:
            if isinstance(e.inner_exception, VocabularyError):  # the model's fault: say so plainly
                raise e.inner_exception from None
            raise

    forward.kiln_backend = backend
    return forward
