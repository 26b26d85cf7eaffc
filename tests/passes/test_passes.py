"""Each pass rewrites what it should and leaves the numbers unchanged, on fresh random inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kiln.frontend.loader import lay_out_adjacent
from kiln.ir import ops
from kiln.ir.graph import Graph, is_kiln_op
from kiln.passes import PIPELINE, run_passes


class Block(nn.Module):
    """What the passes look for: sibling linears (q/k/v with bias, HF-style gate/up), the
    cat(gate, up) -> silu_and_mul form, act(gate) * up, and a residual add before an RMSNorm."""

    adjacent_weights = (("q", "k", "v"),)

    def __init__(self, d=16):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(d, n) for n in (d, d // 2, d // 2))
        self.gate, self.up = nn.Parameter(torch.randn(24, d)), nn.Parameter(torch.randn(24, d))
        self.gate2, self.up2 = nn.Parameter(torch.randn(24, d)), nn.Parameter(torch.randn(24, d))
        self.norm = nn.Parameter(torch.randn(d))

    def forward(self, x, residual):
        q, k, v = (ops.linear(x, m.weight, m.bias) for m in (self.q, self.k, self.v))
        mlp = ops.silu_and_mul(torch.cat([ops.linear(x, self.gate), ops.linear(x, self.up)], dim=-1))
        hf_mlp = F.silu(ops.linear(residual, self.gate2)) * ops.linear(residual, self.up2)
        summed = q + residual
        return ops.rms_norm(summed, self.norm, 1e-6), summed, k * 2, v.float(), mlp, hf_mlp


def compiled_with(block: nn.Module, names: list[str]) -> tuple:
    """(block compiled through a backend that runs the named passes, the list its graphs after the
    passes go into as it traces)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(run_passes(Graph(gm, example_inputs), names))
        return graphs[-1].gm.forward

    return torch.compile(block, backend=backend, dynamic=True, fullgraph=True), graphs


def run(names: list[str]):
    """Trace Block through a backend that applies the passes; return (reference outputs, compiled
    outputs on new random inputs, the graph after the passes)."""
    torch._dynamo.reset()  # each test traces Block afresh (and stays under the recompile limit)
    torch.manual_seed(torch.randint(0, 2**31, ()).item())  # fresh weights and inputs each run
    block = Block().eval()
    lay_out_adjacent(block)
    compiled, graphs = compiled_with(block, names)
    x, r = torch.randn(5, 16), torch.randn(5, 16)
    with torch.no_grad():
        compiled(x, r)
        x, r = torch.randn(7, 16), torch.randn(7, 16)
        return block(x, r), compiled(x, r), graphs[0]


def count(graph: Graph, op: str) -> int:
    return sum(1 for _ in graph.calls(op))


@pytest.mark.parametrize("name", PIPELINE)
def test_each_pass_keeps_the_numbers(name):
    ref, got, _ = run([name])
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_merge_linears_merges_siblings_without_copying_adjacent_weights():
    _, _, graph = run(["merge_linears"])
    assert count(graph, "linear") == 0 and count(graph, "merged_linear") == 3  # qkv, gate/up, gate2/up2
    block = Block()
    lay_out_adjacent(block)
    merged = ops._adjacent([block.q.weight, block.k.weight, block.v.weight])
    assert merged.untyped_storage().data_ptr() == block.q.weight.untyped_storage().data_ptr()  # a view
    assert ops._adjacent([block.gate, block.up]).data_ptr() != block.gate.data_ptr()  # not adjacent: a copy


def test_noop_elimination_then_activation_fusion():
    _, _, graph = run(["merge_linears", "noop_elimination", "fuse_activation"])
    targets = [str(n.target) for n in graph.graph.nodes]
    assert "<built-in method cat of type object at" not in " ".join(targets) and not any("cat" == t for t in targets)
    assert count(graph, "silu_and_mul") == 2  # the cat(split) form and the act(a) * b form
    assert not any(n.target is F.silu for n in graph.graph.nodes)
    assert not any(n.op == "call_method" and n.target == "float" for n in graph.graph.nodes)  # same-dtype cast gone


def test_add_rms_norm_fusion():
    _, _, graph = run(["fuse_add_rms_norm"])
    assert count(graph, "rms_norm") == 0 and count(graph, "add_rms_norm") == 1


def test_full_pipeline_and_dump(tmp_path):
    ref, got, graph = run(PIPELINE)
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    run_passes(graph, [], str(tmp_path))
    assert "kiln.merged_linear" in (tmp_path / "00-input.txt").read_text()


def test_unknown_pass_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown passes"):
        run_passes(None, ["fuse_everything"])


class AttentionBlock(nn.Module):
    """q/k/v projections, rotary, then paged attention: what fuse_rotary_cache_write looks for."""

    def __init__(self, heads=4, kv_heads=2, head_dim=8):
        super().__init__()
        d = heads * head_dim
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.wq, self.wk, self.wv = (nn.Parameter(torch.randn(n * head_dim, d) * 0.2) for n in (heads, kv_heads, kv_heads))
        freqs = torch.arange(64).float()[:, None] / (100 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        self.register_buffer("cos_sin", torch.cat((freqs.cos(), freqs.sin()), -1))

    def forward(self, x, positions):
        q = ops.linear(x, self.wq).unflatten(-1, (self.heads, self.head_dim))
        k = ops.linear(x, self.wk).unflatten(-1, (self.kv_heads, self.head_dim))
        v = ops.linear(x, self.wv).unflatten(-1, (self.kv_heads, self.head_dim))
        q, k = ops.rotary(q, k, positions, self.cos_sin, True)
        return ops.attention(q, k, v, 0, self.head_dim ** -0.5)


def scattered_prefill():
    """(attention metadata, positions): two sequences of 3 and 4 tokens prefilled into scattered
    slots of a 9-block cache of 4-token blocks."""
    from kiln.ir import AttentionMetadata

    lens = [3, 4]
    blocks = torch.randperm(9)[:4].reshape(2, 2)
    slots = torch.cat([blocks[i, p // 4] * 4 + p % 4 for i, n in enumerate(lens) for p in torch.arange(n)[None]])
    return AttentionMetadata(slots, blocks, lens, lens, 4), torch.cat([torch.arange(n) for n in lens])


def test_rotary_cache_write_fusion_keeps_outputs_and_cache():
    from kiln.ir import ForwardContext, set_forward_context

    torch._dynamo.reset()
    torch.manual_seed(torch.randint(0, 2**31, ()).item())
    block = AttentionBlock().eval()
    compiled, graphs = compiled_with(block, ["fuse_rotary_cache_write"])
    md, positions = scattered_prefill()
    x = torch.randn(7, 32)
    caches = {}
    for name, fn in (("eager", block), ("compiled", compiled)):
        caches[name] = (torch.zeros(9, 4, 2, 8), torch.zeros(9, 4, 2, 8))
        with set_forward_context(ForwardContext(md, [caches[name]])), torch.no_grad():
            caches[name + "_out"] = fn(x, positions)
    torch.testing.assert_close(caches["compiled_out"], caches["eager_out"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(caches["compiled"][0], caches["eager"][0])  # the fused op wrote the same keys
    torch.testing.assert_close(caches["compiled"][1], caches["eager"][1])
    assert caches["eager"][0].abs().sum() > 0
    assert count(graphs[0], "rotary") == 0 and count(graphs[0], "rotary_kv_write") == 1
    assert next(graphs[0].calls("attention")).kwargs.get("kv_written") is True


class NormLinearBlock(nn.Module):
    """A residual add + RMSNorm read only by sibling linears (merged by merge_linears), then a
    plain RMSNorm read only by one biased linear, a norm read by two ops (not fused), and gated
    activations (silu, gelu tanh) each read only by a linear."""

    adjacent_weights = (("a", "b"),)

    def __init__(self, d=16):
        super().__init__()
        self.a, self.b = nn.Linear(d, 8, bias=False), nn.Linear(d, 8, bias=False)
        self.c = nn.Linear(16, d)
        self.d, self.e = nn.Linear(8, 4), nn.Linear(8, 4, bias=False)
        self.g1, self.g2, self.g3 = (nn.Parameter(torch.rand(d) + 0.5) for _ in range(3))

    def forward(self, x, residual):
        normed, summed = ops.add_rms_norm(x, residual, self.g1, 1e-6)
        ab = torch.cat([ops.linear(normed, self.a.weight), ops.linear(normed, self.b.weight)], -1)
        out = ops.linear(ops.rms_norm(ab, self.g2, 1e-6), self.c.weight, self.c.bias)
        shared = ops.rms_norm(out + summed, self.g3, 1e-6)
        gated = ops.linear(ops.silu_and_mul(ab), self.d.weight, self.d.bias)
        gelu = ops.linear(ops.gelu_and_mul(ab, "tanh"), self.e.weight)
        return out, summed, ops.linear(shared, self.a.weight) + shared[..., :8], gated, gelu


def test_norm_and_activation_linear_fusions_keep_the_numbers():
    torch._dynamo.reset()
    torch.manual_seed(torch.randint(0, 2**31, ()).item())
    block = NormLinearBlock().eval()
    lay_out_adjacent(block)
    compiled, graphs = compiled_with(block, ["merge_linears", "noop_elimination", "fuse_norm_linear",
                                             "fuse_activation_linear"])
    with torch.no_grad():
        compiled(torch.randn(3, 16), torch.randn(3, 16))
        x, r = torch.randn(5, 16), torch.randn(5, 16)
        for a, b in zip(block(x, r), compiled(x, r)):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    graph = graphs[0]
    assert count(graph, "add_rms_norm_linear") == 1 and count(graph, "add_rms_norm") == 0
    assert count(graph, "rms_norm_linear") == 1 and count(graph, "rms_norm") == 1  # the shared one stays
    assert count(graph, "merged_linear") == 0 and count(graph, "linear") == 1
    fused = next(graph.calls("add_rms_norm_linear"))
    assert len(fused.args[4]) == 2  # both sibling weights, one matrix
    assert [n.args[1] for n in graph.calls("act_and_mul_linear")] == ["silu", "gelu_tanh"]
    assert count(graph, "silu_and_mul") == 0 and count(graph, "gelu_and_mul") == 0


class NormAttentionBlock(nn.Module):
    """A residual add + RMSNorm read by sibling q/k/v projections, rotary, then paged attention
    (a Llama layer's attention half), then a plain RMSNorm feeding another such attention: what
    fuse_linear_rope looks for, in both norm forms, after merge_linears, fuse_add_rms_norm,
    fuse_norm_linear and fuse_rotary_cache_write."""

    adjacent_weights = (("wq", "wk", "wv"), ("wq2", "wk2", "wv2"))

    def __init__(self, heads=4, kv_heads=2, head_dim=8, neox=True):
        super().__init__()
        d = heads * head_dim
        self.heads, self.kv_heads, self.head_dim, self.neox = heads, kv_heads, head_dim, neox
        for suffix in ("", "2"):
            for name, n in (("wq", heads), ("wk", kv_heads), ("wv", kv_heads)):
                setattr(self, name + suffix, nn.Parameter(torch.randn(n * head_dim, d) * 0.2))
        self.g1, self.g2 = (nn.Parameter(torch.rand(d) + 0.5) for _ in range(2))
        freqs = torch.arange(64).float()[:, None] / (100 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        self.register_buffer("cos_sin", torch.cat((freqs.cos(), freqs.sin()), -1))

    def attend(self, x, positions, layer, suffix):
        q = ops.linear(x, getattr(self, "wq" + suffix)).unflatten(-1, (self.heads, self.head_dim))
        k = ops.linear(x, getattr(self, "wk" + suffix)).unflatten(-1, (self.kv_heads, self.head_dim))
        v = ops.linear(x, getattr(self, "wv" + suffix)).unflatten(-1, (self.kv_heads, self.head_dim))
        q, k = ops.rotary(q, k, positions, self.cos_sin, self.neox)
        return ops.attention(q, k, v, layer, self.head_dim ** -0.5).flatten(-2)

    def forward(self, x, residual, positions):
        out = self.attend(ops.rms_norm(x + residual, self.g1, 1e-6), positions, 0, "")
        return self.attend(ops.rms_norm(out, self.g2, 1e-6), positions, 1, "2"), x + residual


@pytest.mark.parametrize("neox", [True, False])
def test_linear_rope_fusion_keeps_outputs_and_caches(neox):
    from kiln.ir import ForwardContext, set_forward_context

    torch._dynamo.reset()
    torch.manual_seed(torch.randint(0, 2**31, ()).item())
    block = NormAttentionBlock(neox=neox).eval()
    lay_out_adjacent(block)
    compiled, graphs = compiled_with(block, ["merge_linears", "fuse_add_rms_norm", "fuse_norm_linear",
                                             "fuse_rotary_cache_write", "fuse_linear_rope"])
    md, positions = scattered_prefill()
    x, r = torch.randn(7, 32), torch.randn(7, 32)
    results = {}
    for name, fn in (("eager", block), ("compiled", compiled)):
        caches = [(torch.zeros(9, 4, 2, 8), torch.zeros(9, 4, 2, 8)) for _ in range(2)]
        with set_forward_context(ForwardContext(md, caches)), torch.no_grad():
            results[name] = fn(x, r, positions), caches
    for a, b in zip(results["eager"][0], results["compiled"][0]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for (k_a, v_a), (k_b, v_b) in zip(results["eager"][1], results["compiled"][1]):
        assert k_a.abs().sum() > 0
        torch.testing.assert_close(k_b, k_a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v_b, v_a, rtol=1e-5, atol=1e-5)
    graph = graphs[0]
    assert count(graph, "add_rms_norm_linear_rope") == 1 and count(graph, "rms_norm_linear_rope") == 1
    assert count(graph, "rotary_kv_write") == 0 and count(graph, "add_rms_norm_linear") == 0
    assert all(att.kwargs.get("kv_written") is True for att in graph.calls("attention"))


class RowParallelBlock(nn.Module):
    """A tensor-parallel layer's row-parallel linears and their all_reduce (models/parallel.py): a
    plain one (attention's output), one after a gated activation (the MLP's down), and two the pass
    leaves alone: a linear that something besides the all_reduce reads, and an all_reduce of what
    is not a linear (a vocab-parallel embedding's rows)."""

    def __init__(self, d=16):
        super().__init__()
        self.o, self.down, self.other = (nn.Parameter(torch.randn(d, n) * 0.3) for n in (d, 12, d))

    def forward(self, x, gate_up):
        attn = ops.all_reduce(ops.linear(x, self.o))
        mlp = ops.all_reduce(ops.linear(ops.silu_and_mul(gate_up), self.down))
        read_twice = ops.linear(x, self.other)
        return attn + mlp, ops.all_reduce(read_twice) + read_twice, ops.all_reduce(x * 2)


def test_linear_all_reduce_fusion_takes_the_row_parallel_linears():
    torch._dynamo.reset()
    torch.manual_seed(torch.randint(0, 2**31, ()).item())
    block = RowParallelBlock().eval()
    compiled, graphs = compiled_with(block, ["fuse_activation_linear", "fuse_linear_all_reduce"])
    with torch.no_grad():
        compiled(torch.randn(3, 16), torch.randn(3, 24))
        x, gate_up = torch.randn(5, 16), torch.randn(5, 24)
        for a, b in zip(block(x, gate_up), compiled(x, gate_up)):  # (one rank: all_reduce is the identity)
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    graph = graphs[0]
    assert [n.args[1] for n in graph.calls("linear_all_reduce")] == ["", "silu"]
    assert count(graph, "all_reduce") == 2 and count(graph, "act_and_mul_linear") == 0 and count(graph, "linear") == 1


class MlpBlock(nn.Module):
    """Three Llama-style layers' halves: a residual add + RMSNorm read by a linear (standing in for
    the attention's q/k/v), whose output goes through an add + RMSNorm into a gated MLP (HF-style
    sibling gate/up, silu, down). The first two MLPs are read by the next layer's norm + linear, the
    last by a final add_rms_norm: the readers fuse_mlp looks for."""

    adjacent_weights = tuple((f"gate{i}", f"up{i}") for i in range(3))

    def __init__(self, d=16, i=32):
        super().__init__()
        for n in range(3):
            setattr(self, f"gate{n}", nn.Parameter(torch.randn(i, d) * 0.3))
            setattr(self, f"up{n}", nn.Parameter(torch.randn(i, d) * 0.3))
            setattr(self, f"down{n}", nn.Parameter(torch.randn(d, i) * 0.3))
            setattr(self, f"attn{n}", nn.Parameter(torch.randn(d, d) * 0.3))
        self.norms = nn.Parameter(torch.rand(7, d) + 0.5)

    def forward(self, x, residual):
        for n in range(3):
            normed, residual = ops.add_rms_norm(x, residual, self.norms[2 * n], 1e-6)
            x = ops.linear(normed, getattr(self, f"attn{n}"))
            normed, residual = ops.add_rms_norm(x, residual, self.norms[2 * n + 1], 1e-6)
            gate, up = ops.linear(normed, getattr(self, f"gate{n}")), ops.linear(normed, getattr(self, f"up{n}"))
            x = ops.linear(F.silu(gate) * up, getattr(self, f"down{n}"))
        return ops.add_rms_norm(x, residual, self.norms[6], 1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mlp_fusion_hands_partial_sums_to_the_next_norm_gemv(dtype):
    """Compiled through the pipeline, MlpBlock gives the eager numbers at one row (where the fused
    MLPs hand their outputs on as partial sums) and at several. In bfloat16 the three MLPs become
    add_rms_norm_mlp, each read by a norm + linear (the last by the final norm) given its partials,
    with down transposed; float32 weights, which the one-launch MLP does not take, stay as they are."""
    torch._dynamo.reset()
    torch.manual_seed(torch.randint(0, 2**31, ()).item())
    block = MlpBlock().eval().to(dtype)
    lay_out_adjacent(block)
    compiled, graphs = compiled_with(block, PIPELINE)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    with torch.no_grad():
        for rows in (3, 1, 5, 1):
            x, r = torch.randn(rows, 16).to(dtype), torch.randn(rows, 16).to(dtype)
            for a, b in zip(block(x, r), compiled(x, r)):
                torch.testing.assert_close(b, a, **tol)
    graph = graphs[0]
    mlps = list(graph.calls("add_rms_norm_mlp"))
    if dtype == torch.float32:
        assert not mlps and count(graph, "act_and_mul_linear") == 3
        return
    assert [m.args[7:] for m in mlps] == [(0, 3), (1, 3), (2, 3)] and count(graph, "act_and_mul_linear") == 0
    for m, reader_op in zip(mlps, ["add_rms_norm_linear"] * 2 + ["add_rms_norm"]):
        (partials,) = [u for u in m.users if u.args[1] == 2]
        (reader,) = partials.users
        assert is_kiln_op(reader, reader_op) and reader.args[-1] is partials
        assert tuple(graph.example_value(m.args[6]).shape) == (32, 16)  # down, transposed


@pytest.mark.parametrize("scheme", ["int8_weight_only", "fp8_weight_only"])
def test_mlp_fusion_takes_8bit_weight_only_mlps_when_asked(scheme):
    """After the quantize pass, with eight_bit (off by default until timed), the three MLPs become
    add_rms_norm_mlp with their scales, down given both transposed (8-bit) and as it was; the numbers
    are those of the same quantized graph without the fusion, at one row and at several."""
    torch.manual_seed(torch.randint(0, 2**31, ()).item())
    block = MlpBlock().eval().to(torch.bfloat16)
    lay_out_adjacent(block)
    inputs = [tuple(torch.randn(rows, 16).to(torch.bfloat16) for _ in range(2)) for rows in (3, 1, 1)]
    results, graphs = {}, {}
    for eight_bit in (False, True):
        torch._dynamo.reset()
        made = []

        def backend(gm, example_inputs, eight_bit=eight_bit):
            options = {"quantize": {"scheme": scheme}, "fuse_mlp": {"eight_bit": eight_bit}}
            made.append(run_passes(Graph(gm, example_inputs), PIPELINE, options=options))
            return made[-1].gm.forward

        compiled = torch.compile(block, backend=backend, dynamic=True, fullgraph=True)
        with torch.no_grad():
            results[eight_bit] = [compiled(x, r) for x, r in inputs]
        graphs[eight_bit] = made[0]
    for apart, fused in zip(results[False], results[True]):
        for a, b in zip(apart, fused):
            torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-2)
    assert count(graphs[False], "add_rms_norm_mlp") == 0
    mlps = list(graphs[True].calls("add_rms_norm_mlp"))
    assert len(mlps) == 3 and count(graphs[True], "act_and_mul_linear") == 0
    for m in mlps:
        down_t, w_scale, down_scale, down = (graphs[True].example_value(a) for a in m.args[6:7] + m.args[9:12])
        assert down_t.dtype in (torch.int8, torch.float8_e4m3fn) and tuple(down_t.shape) == (32, 16)
        assert tuple(down.shape) == (16, 32) and w_scale.numel() == 64 and down_scale.numel() == 16


def test_transposed_bytes_counts_the_down_weights_the_pass_copies():
    """What the engine keeps out of the KV cache for the pass's transposed copies: each gated MLP's
    down weight in a dtype and shape the one launch takes (bf16 here), nothing for float32 ones or
    for modules that are not gated MLPs."""
    from kiln.passes.fuse_mlp import transposed_bytes

    class Mlp(nn.Module):
        def __init__(self, d, i):
            super().__init__()
            self.gate_proj, self.up_proj = nn.Linear(d, i, bias=False), nn.Linear(d, i, bias=False)
            self.down_proj = nn.Linear(i, d, bias=False)

    model = nn.ModuleList([Mlp(16, 32), Mlp(16, 32), nn.Linear(16, 16), Mlp(16, 40)])  # 40 rows: not taken
    assert transposed_bytes(model) == 0  # float32
    model = model.to(torch.bfloat16)
    assert transposed_bytes(model) == 2 * 16 * 32 * 2


class EmbedBlock(nn.Module):
    """A model's start: the token embedding, read by the first norm + linear (standing in for the
    q/k/v projection) and by the residual add after it."""

    def __init__(self, vocab=40, d=16):
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab, d))
        self.norms = nn.Parameter(torch.rand(2, d) + 0.5)
        self.w = nn.Parameter(torch.randn(24, d) * 0.3)

    def forward(self, ids):
        hidden = ops.embedding(ids, self.table)
        y = ops.linear(ops.rms_norm(hidden, self.norms[0], 1e-6), self.w)
        return ops.add_rms_norm(y[:, :16], hidden, self.norms[1], 1e-6)


def test_embedding_fusion_gathers_the_first_norm_linears_row():
    """Through the pipeline, the embedding and the norm + linear that reads it become one
    embedding_rms_norm_linear, whose second output the residual add reads; the eager numbers at one
    token and at several. Without the pass the embedding stays."""
    torch.manual_seed(torch.randint(0, 2**31, ()).item())
    block = EmbedBlock().eval()
    for names, fused in ((PIPELINE, 1), ([p for p in PIPELINE if p != "fuse_embedding"], 0)):
        torch._dynamo.reset()
        compiled, graphs = compiled_with(block, names)
        with torch.no_grad():
            for rows in (1, 4, 1):
                ids = torch.randint(0, 40, (rows,))
                for a, b in zip(block(ids), compiled(ids)):
                    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        graph = graphs[0]
        assert count(graph, "embedding_rms_norm_linear") == fused and count(graph, "embedding") == 1 - fused
        assert count(graph, "rms_norm_linear") == 1 - fused
        if fused:
            (op,) = graph.calls("embedding_rms_norm_linear")
            (hidden,) = [u for u in op.users if u.args[1] == 1]
            assert [is_kiln_op(u, "add_rms_norm") for u in hidden.users] == [True]
