"""The attention of a rotated q/k/v projection into the projection's op:

    qkv = rms_norm_linear_rope(x, ..., layer, H, Hkv, D)       (or add_rms_norm_linear_rope(...)[0])
    q, k, v = qkv.split([H*D, Hkv*D, Hkv*Dv]) each unflattened into heads
    out = attention(q, k, v, layer, scale, kv_written=True)     (causal, no window, cap, sinks or ALiBi)
 -> qkv, out = rms_norm_linear_rope_attention(x, ..., layer, H, Hkv, D, scale)
    (or add_rms_norm_linear_rope_attention, which also returns x + residual)

Same numbers (the op's reference is the two ops in a row). What it is for is on the GPU: a
one-sequence decode step may run the projection and its attention in one launch
(`kernels/qkv_attention.py`), with no launch boundary between them. Runs after fuse_linear_rope,
which makes the projection op.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from kiln.ir.graph import Graph, norm_op_output

NAME = "fuse_rope_attention"

_FUSED = {"rms_norm_linear_rope": torch.ops.kiln.rms_norm_linear_rope_attention.default,
          "add_rms_norm_linear_rope": torch.ops.kiln.add_rms_norm_linear_rope_attention.default}

# attention's keyword arguments that must keep these values (its plain causal form) for the fusion
_PLAIN = {"sliding_window": 0, "causal": True, "soft_cap": 0.0, "sinks": None, "alibi_slopes": None}


def _source(view: fx.Node) -> tuple[fx.Node, int] | None:
    """(the split, the part's index) of `split(...)[i].unflatten(-1, ...)`."""
    is_unflatten = (view.op == "call_method" and view.target == "unflatten") or view.target is torch.unflatten
    if not (isinstance(view, fx.Node) and is_unflatten):
        return None
    part = view.args[0]
    if not (isinstance(part, fx.Node) and part.target is operator.getitem):
        return None
    return part.args[0], part.args[1]


def run(graph: Graph) -> Graph:
    g = graph.graph
    for att in list(graph.calls("attention")):
        # (every argument by name, defaults filled in from the op's schema)
        a = att.normalized_arguments(graph.gm, normalize_to_only_use_kwargs=True).kwargs
        if a["kv_written"] is not True or any(a[k] != v for k, v in _PLAIN.items()):
            continue
        sources = [_source(a[n]) if isinstance(a[n], fx.Node) else None for n in ("q", "k", "v")]
        if None in sources or [i for _, i in sources] != [0, 1, 2] or len({s for s, _ in sources}) != 1:
            continue
        split = sources[0][0]
        found = norm_op_output(split.args[0], "rms_norm_linear_rope") if isinstance(split.args[0], fx.Node) else None
        if found is None:
            continue
        projection, name = found
        layer = projection.args[-4]  # (..., layer, heads, kv_heads, head_dim)
        if a["layer"] != layer or not isinstance(a["scale"], float):
            continue
        with g.inserting_after(projection):
            fused = g.call_function(_FUSED[name], (*projection.args, a["scale"]))
        outs = [graph.getitem(fused, i) for i in reversed(range(3 if name == "add_rms_norm_linear_rope" else 2))][::-1]
        if name == "rms_norm_linear_rope":
            projection.replace_all_uses_with(outs[0])
        else:
            for user in list(projection.users):  # the getitems of (qkv, summed)
                user.replace_all_uses_with(outs[user.args[1]])
        att.replace_all_uses_with(outs[-1])
        g.erase_node(att)  # (the projection, now read by nobody, goes with the dead code)
    return graph.finish()
