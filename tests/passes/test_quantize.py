"""The quantize and fuse_quant passes: what they rewrite, and that the rewritten graph computes
exactly what the quantized arithmetic says (weight-only: the dequantized weight; W8A8: the
quantized activations too), on fresh random inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kiln.frontend.loader import lay_out_adjacent
from kiln.ir import ops
from kiln.ir.graph import Graph
from kiln.ir.quant_ops import WeightQuant, dequantize_weight, quantize, quantize_weight
from kiln.passes import run_passes


class Block(nn.Module):
    """norm -> q/k/v (adjacent, biased) ; add + norm -> gate/up -> silu_and_mul -> down."""

    adjacent_weights = (("q", "k", "v"),)

    def __init__(self, d=32):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(d, n) for n in (d, d // 2, d // 2))
        self.gate_up = nn.Parameter(torch.randn(48, d) / d**0.5)
        self.down = nn.Parameter(torch.randn(d, 24) / 24**0.5)
        self.norm1, self.norm2 = nn.Parameter(1 + 0.1 * torch.randn(d)), nn.Parameter(1 + 0.1 * torch.randn(d))

    def forward(self, x, residual):
        h = ops.rms_norm(x, self.norm1, 1e-6)
        q, k, v = (ops.linear(h, m.weight, m.bias) for m in (self.q, self.k, self.v))
        summed = q + residual
        h2 = ops.rms_norm(summed, self.norm2, 1e-6)
        out = ops.linear(ops.silu_and_mul(ops.linear(h2, self.gate_up)), self.down)
        return out + summed, k, v


def compile_block(block: Block, names: list[str], **options):
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graph = run_passes(Graph(gm, example_inputs), names, options={"quantize": options})
        graphs.append(graph)
        return graph.gm.forward

    return torch.compile(block, backend=backend, dynamic=True, fullgraph=True), graphs


def fresh_block() -> Block:
    torch.manual_seed(torch.randint(0, 2**31, ()).item())
    block = Block().eval()
    lay_out_adjacent(block)
    return block


def ops_in(graph: Graph) -> list[str]:
    return [str(n.target).split(".")[1] for n in graph.calls()]


def weight_only_outputs(names: list[str], kind: str):
    """A fresh block compiled through `names` with weight-only `kind`: (its graph, its outputs on
    random inputs, the outputs of the same block with every weight replaced by its dequantized
    value)."""
    block = fresh_block()
    compiled, graphs = compile_block(block, names, scheme=f"{kind}_weight_only")
    x, r = torch.randn(7, 32), torch.randn(7, 32)
    with torch.no_grad():
        got = compiled(x, r)
        for p in (block.q.weight, block.k.weight, block.v.weight, block.gate_up, block.down):
            p.copy_(dequantize_weight(*quantize_weight(p, kind)))
        return graphs[0], got, block(x, r)


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_weight_only_equals_the_dequantized_model(kind):
    graph, got, want = weight_only_outputs(["merge_linears", "quantize"], kind)
    assert "linear" not in ops_in(graph) and "merged_linear" not in ops_in(graph)
    assert ops_in(graph).count("weight_only_linear") == 3  # qkv (merged), gate_up, down
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_weight_only_linears_take_the_norm_and_activation_fusions(kind):
    """The whole pipeline: each weight-only GEMM folds the norm or activation before it (its scale
    the fused op's w_scale; the 8-bit constants the quantize pass put after the add + norm are
    moved up), and the numbers stay the dequantized model's."""
    from kiln.passes import PIPELINE

    graph, got, want = weight_only_outputs(PIPELINE, kind)
    names = ops_in(graph)
    assert "weight_only_linear" not in names and "rms_norm" not in names and "silu_and_mul" not in names
    fused = [n for n in graph.calls() if str(n.target).split(".")[1].endswith("_linear")]
    assert sorted(str(n.target).split(".")[1] for n in fused) == [
        "act_and_mul_linear", "add_rms_norm_linear", "rms_norm_linear"]
    assert all(n.args[-1] is not None for n in fused)  # each with its weight's scale
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_w8a8_quantizes_activations_per_token(kind):
    block = fresh_block()
    compiled, graphs = compile_block(block, ["merge_linears", "quantize"], scheme=kind)
    x, r = torch.randn(5, 32), torch.randn(5, 32)
    with torch.no_grad():
        _, k, _ = compiled(x, r)
        h = ops.rms_norm(x, block.norm1, 1e-6)
        hq, hs = quantize(h, kind)
        wq, ws = quantize_weight(block.k.weight, kind)
        want = (hq.float() * hs) @ dequantize_weight(wq, ws).t() + block.k.bias
    torch.testing.assert_close(k, want, rtol=1e-5, atol=1e-5)
    names = ops_in(graphs[0])
    assert names.count("scaled_linear") == 3 and names.count("quantize") == 3  # one per distinct input


def test_fuse_quant_folds_quantize_into_norms_and_activation_without_changing_numbers():
    block = fresh_block()
    plain, plain_graphs = compile_block(block, ["merge_linears", "quantize"], scheme="int8")
    x, r = torch.randn(6, 32), torch.randn(6, 32)
    with torch.no_grad():
        want = plain(x, r)
        fused, graphs = compile_block(block, ["merge_linears", "quantize", "fuse_add_rms_norm", "fuse_quant"],
                                      scheme="int8")
        got = fused(x, r)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    names = ops_in(graphs[0])
    assert "quantize" not in names
    assert {"rms_norm_quant", "add_rms_norm_quant", "silu_and_mul_quant"} <= set(names)


def test_prequantized_weights_are_rewritten_without_a_scheme_and_copies_are_shared():
    block = fresh_block()
    with torch.no_grad():
        data, scale = quantize_weight(block.down, "fp8")
        block.down.requires_grad_(False)
        block.down.data = data
    block.down.kiln_quant = WeightQuant("fp8", scale, activations=False)
    compiled, graphs = compile_block(block, ["merge_linears", "quantize"])
    with torch.no_grad():
        compiled(torch.randn(3, 32), torch.randn(3, 32))
        compiled(torch.randn(1, 32), torch.randn(1, 32))  # torch.compile specialises one token: a second graph
    assert len(graphs) == 2
    for graph in graphs:
        assert ops_in(graph).count("weight_only_linear") == 1 and ops_in(graph).count("merged_linear") == 1
    consts = [[getattr(g.gm, n.target) for n in g.graph.nodes if n.op == "get_attr"] for g in graphs]
    assert consts[0][0].data_ptr() == consts[1][0].data_ptr() == block.down.data_ptr()  # the parameter itself


def test_unknown_scheme_is_a_clear_error():
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="quantization='int4' is not supported"):
        compile_block(fresh_block(), ["quantize"], scheme="int4")[0](torch.randn(2, 32), torch.randn(2, 32))
