"""Rotary + cache write into the attention: `attention(kv_written=True)` whose q and k come from a
`rotary_kv_write` that nothing else reads becomes one `rotary_attention` with it.

Same numbers everywhere (the op's reference is the two ops in a row). What it buys is on the GPU:
a decode step's attention kernel rotates q and the step's key and writes the key and value into
the cache on its way in, so rotary is no launch of its own (`kernels/decode_attention.py`); other
steps run the two kernels as before. Runs after fuse_rotary_cache_write (which makes the
`rotary_kv_write` it folds).
"""

from __future__ import annotations

import inspect
import operator

import torch

from kiln.ir import ops
from kiln.ir.graph import Graph, is_kiln_op

NAME = "fuse_rotary_attention"

_ATTENTION = inspect.signature(ops.attention)


def run(graph: Graph) -> Graph:
    g = graph.graph
    for att in list(graph.calls("attention")):
        bound = _ATTENTION.bind(*att.args, **att.kwargs)
        q, k = bound.arguments["q"], bound.arguments["k"]
        rot = _source(q, 0)
        if not bound.arguments.get("kv_written") or rot is None or _source(k, 1) is not rot:
            continue
        # the rotated q and k feed this attention alone (a getitem each, read only here)
        if len(rot.users) != 2 or len(q.users) != 1 or len(k.users) != 1:
            continue
        q_in, k_in, v_in, positions, cache, is_neox, layer = rot.args[:7]
        if v_in is not bound.arguments["v"] or layer != bound.arguments["layer"]:
            continue
        args = bound.arguments
        with g.inserting_before(att):
            fused = g.call_function(
                torch.ops.kiln.rotary_attention.default,
                (q_in, k_in, v_in, positions, cache, is_neox, layer, args["scale"]),
                {name: args[name] for name in ("sliding_window", "causal", "soft_cap", "sinks", "alibi_slopes")
                 if name in args})
        fused.meta["example_value"] = att.meta.get("example_value")
        att.replace_all_uses_with(fused)
    return graph.finish()


def _source(node, index: int):
    """The rotary_kv_write whose output `index` node is (a getitem of it), else None."""
    if not (isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is operator.getitem):
        return None
    parent, i = node.args
    return parent if i == index and is_kiln_op(parent, "rotary_kv_write") else None
