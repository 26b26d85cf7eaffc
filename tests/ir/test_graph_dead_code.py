"""Dead-code elimination in `Graph.finish` keeps in-place writes into buffers whose result no node
reads (HF's latent attention fills its query that way)."""

from __future__ import annotations

import torch

from kiln.ir.graph import Graph


def fill(x: torch.Tensor) -> torch.Tensor:
    buffer = x.new_empty(x.shape[0], 2 * x.shape[1])
    buffer[:, : x.shape[1]] = x  # setitem
    buffer[:, x.shape[1]:].copy_(x * 2)  # copy_ into a view
    unused = x + 1  # really dead
    return buffer


def test_finish_keeps_in_place_writes_and_drops_dead_nodes():
    graphs = []

    def backend(gm, example_inputs):
        graph = Graph(gm, example_inputs).finish()
        graphs.append(graph)
        return graph.gm.forward

    x = torch.randn(3, 4)
    out = torch.compile(fill, backend=backend, fullgraph=True)(x)
    torch.testing.assert_close(out, torch.cat((x, 2 * x), 1))
    nodes = [str(n.target) for n in graphs[0].graph.nodes]
    assert any("copy_" in t for t in nodes) and any("setitem" in t for t in nodes)
    assert not any(n.op == "call_function" and n.target is torch.add or str(n.target) == "<built-in function add>"
                   for n in graphs[0].graph.nodes), "the unused add is dropped"
