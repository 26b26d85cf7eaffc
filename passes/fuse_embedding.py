"""The token embedding into the first norm + linear that reads it:

    hidden = embedding(ids, table)
    y = rms_norm_linear(hidden, ...)                  (or rms_norm_linear_rope)
 -> y, hidden = embedding_rms_norm_linear(ids, table, ...)   (or embedding_rms_norm_linear_rope)

The embedding's other readers (the first layer's residual add) read the op's second output.

Same numbers (the ops' references are the two ops in a row). What it buys is on the GPU: a batch-1
step's first gemv gathers its own row from the table (`quant_gemm`'s X_INDEX), so the embedding
is no launch of its own: one launch boundary less a step, at its start, where the gather was an
aten kernel that the first gemv could not overlap through PDL. Runs after fuse_linear_rope, which
makes the rotary form. A model that scales its embeddings (Gemma) or normalizes them otherwise
has ops between the two, and is left alone; so is a vocab-parallel embedding (tensor
parallelism: `models/parallel.py`), whose rows reach the norm through a mask and an all-reduce.
"""

from __future__ import annotations

import torch
from torch import fx

from kiln.ir.graph import Graph, is_kiln_op

NAME = "fuse_embedding"

_FUSED = {"rms_norm_linear": torch.ops.kiln.embedding_rms_norm_linear.default,
          "rms_norm_linear_rope": torch.ops.kiln.embedding_rms_norm_linear_rope.default}


def _reader(embedding: fx.Node) -> tuple[fx.Node, str] | None:
    """(the one norm + linear that takes the embedding as its row, its op's name)."""
    readers = [(n, name) for n in embedding.users for name in _FUSED if is_kiln_op(n, name)]
    if len(readers) != 1:
        return None
    node, name = readers[0]
    if node.kwargs or node.args[0] is not embedding or embedding in node.args[1:]:
        return None
    return node, name


def run(graph: Graph) -> Graph:
    g = graph.graph
    order = {n: i for i, n in enumerate(g.nodes)}
    for embedding in list(graph.calls("embedding")):
        found = _reader(embedding)
        if found is None or embedding.kwargs or len(embedding.args) != 2:
            continue
        node, name = found
        # the op takes the norm + linear's place: the embedding's other readers must come after it
        if any(order[u] < order[node] for u in embedding.users):
            continue
        with g.inserting_before(node):
            fused = g.call_function(_FUSED[name], (*embedding.args, *node.args[1:]))
        out, hidden = graph.getitem(fused, 0), graph.getitem(fused, 1)
        node.replace_all_uses_with(out)
        g.erase_node(node)
        embedding.replace_all_uses_with(hidden)
        g.erase_node(embedding)
    return graph.finish()
