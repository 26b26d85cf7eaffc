"""Lowering: the kiln ops that are plain aten code everywhere reach Inductor as that code, with the
reference's result."""

from __future__ import annotations

import pytest
import torch

from kiln.codegen.lower import ATEN_OPS, inline_aten_ops
from kiln.ir import ops


class Block(torch.nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.table = torch.nn.Parameter(torch.randn(50, 16))
        self.w1, self.b1 = torch.nn.Parameter(torch.randn(24, 16)), torch.nn.Parameter(torch.randn(24))
        self.w2 = torch.nn.Parameter(torch.randn(16, 24))
        self.ln_w, self.ln_b = torch.nn.Parameter(torch.rand(16) + 0.5), torch.nn.Parameter(torch.randn(16))

    def forward(self, ids):
        h = ops.embedding(ids, self.table)
        h = ops.activation(ops.linear(h, self.w1, self.b1), self.kind)
        h = ops.linear(h, self.w2, bias=None)
        return ops.layer_norm(h, self.ln_w, bias=self.ln_b, eps=1e-5)


@pytest.mark.parametrize("kind", ["gelu", "gelu_tanh", "relu", "silu", "tanh", "sigmoid"])
def test_inlined_ops_give_the_reference(kind):
    model = Block(kind)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        inline_aten_ops(gm, ATEN_OPS)
        return gm.forward

    ids = torch.randint(0, 50, (7,))
    with torch.no_grad():
        expected = model(ids)
        got = torch.compile(model, backend=backend, fullgraph=True)(ids)
    targets = {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}
    assert not any(t.startswith("kiln.") for t in targets), targets
    assert {"aten.embedding.default", "aten.linear.default", "aten.layer_norm.default"} <= targets
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
