"""Graph rewrites, each a pure function `run(Graph) -> Graph` in its own module.

PIPELINE is the order they run in; `LLM(..., compilation_config={"passes": [...]})` picks a subset
by name. Adding a pass is one file here and one line in PIPELINE (README: "Writing a pass").
"""

from __future__ import annotations

import importlib
import os

from kiln.ir.graph import Graph

PIPELINE = [
    "merge_linears",  # sibling linears on one input -> one linear + split (QKV, gate/up)
    "noop_elimination",  # cat(split(x)) -> x, same-dtype casts, identity reshapes
    "quantize",  # linear -> 8-bit GEMM, when asked (quantization=...) or when the checkpoint is 8-bit
    "fuse_activation",  # act(a) * b over the halves of one tensor -> silu_and_mul / gelu_and_mul
    "fuse_add_rms_norm",  # add then rms_norm -> add_rms_norm
    "fuse_quant",  # norm / activation feeding a per-token quantize -> one op that does both
    "fuse_norm_linear",  # RMSNorm read only by a linear -> one op (a batch-1 gemv normalizes its row)
    "fuse_activation_linear",  # gated activation read only by a linear -> one op (the gemv gates its row)
    "fuse_linear_all_reduce",  # a row-parallel linear + its all_reduce -> one op (a 2-GPU gemv may sum its row)
    "fuse_rotary_cache_write",  # rotary feeding attention -> rotary_kv_write + attention(kv_written=True)
    "fuse_linear_rope",  # norm + q/k/v linear feeding rotary_kv_write -> one op (a batch-1 gemv rotates its outputs)
    "fuse_embedding",  # the token embedding read by the first norm + linear -> one op (the batch-1 gemv gathers its row)
    "fuse_mlp",  # norm + gate/up + down read by the next norm gemv -> one op (a batch-1 MLP is one launch)
]


def run_passes(graph: Graph, names: list[str] | None = None, dump_dir: str | None = None,
               options: dict[str, dict] | None = None) -> Graph:
    """Run the named passes (default: all) in pipeline order; with dump_dir, write the IR before
    and after each one (00-input.txt, 01-merge_linears.txt, ...). `options[name]` are keyword
    arguments for that pass (the quantize pass's scheme)."""
    names = PIPELINE if names is None else names
    unknown = [n for n in names if n not in PIPELINE]
    if unknown:
        raise ValueError(f"unknown passes {unknown}; known: {', '.join(PIPELINE)}")
    if dump_dir:
        os.makedirs(dump_dir, exist_ok=True)
        _write(dump_dir, "00-input.txt", graph.dump())
    for i, name in enumerate((n for n in PIPELINE if n in names), start=1):
        graph = importlib.import_module(f"kiln.passes.{name}").run(graph, **(options or {}).get(name, {}))
        if dump_dir:
            _write(dump_dir, f"{i:02d}-{name}.txt", graph.dump())
    return graph


def _write(folder: str, name: str, text: str) -> None:
    with open(os.path.join(folder, name), "w") as f:
        f.write(text)
