"""Rotary + KV-cache write: `attention(rotary(q, k)...)` writes the rotated keys (and the values)
into the cache itself; fused, one `rotary_kv_write` rotates and writes in the same pass over k
(one Triton kernel on CUDA), and the attention skips its own write (`kv_written=True`)."""

from __future__ import annotations

import operator

import torch

from kiln.ir.graph import Graph, is_kiln_op

NAME = "fuse_rotary_cache_write"


def run(graph: Graph) -> Graph:
    for att in list(graph.calls("attention")):
        q, k = att.args[0], att.args[1]
        if att.kwargs.get("kv_written") or not all(_is_getitem(n) for n in (q, k)):
            continue
        rot = q.args[0]
        if k.args[0] is not rot or (q.args[1], k.args[1]) != (0, 1) or not is_kiln_op(rot, "rotary"):
            continue
        q_in, k_in, positions, cache, is_neox = rot.args[:5]
        v, layer = att.args[2], att.args[3]
        with graph.graph.inserting_before(att):
            fused = graph.graph.call_function(torch.ops.kiln.rotary_kv_write.default,
                                              (q_in, k_in, v, positions, cache, is_neox, layer))
            new_q = graph.graph.call_function(operator.getitem, (fused, 0))
            new_k = graph.graph.call_function(operator.getitem, (fused, 1))
        q.replace_all_uses_with(new_q)
        k.replace_all_uses_with(new_k)
        att.kwargs = {**att.kwargs, "kv_written": True}
    return graph.finish()


def _is_getitem(node) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is operator.getitem
