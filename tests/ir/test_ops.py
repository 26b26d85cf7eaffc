"""The op vocabulary against independent references: HF's own layers and dense attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kiln.ir import AttentionMetadata, ForwardContext, ops, set_forward_context


@pytest.mark.parametrize("op, args", [
    (ops.embedding, lambda: (torch.randint(0, 10, (5,)), torch.randn(10, 8))),
    (ops.linear, lambda: (torch.randn(5, 8), torch.randn(6, 8), torch.randn(6))),
    (ops.linear, lambda: (torch.randn(5, 8), torch.randn(6, 8), None)),
    (ops.logits, lambda: (torch.randn(3, 8), torch.randn(11, 8))),
    (ops.rms_norm, lambda: (torch.randn(5, 8), torch.randn(8), 1e-6)),
    (ops.add_rms_norm, lambda: (torch.randn(5, 8), torch.randn(5, 8), torch.randn(8), 1e-6)),
    (ops.silu_and_mul, lambda: (torch.randn(5, 16),)),
    (ops.rotary, lambda: (torch.randn(5, 4, 8), torch.randn(5, 2, 8), torch.randint(0, 20, (5,)), torch.randn(20, 8), True)),
])
def test_opcheck(op, args):
    """Schema, fake implementation and autograd registration are consistent (torch's own checker)."""
    torch.library.opcheck(op.op, args(), test_utils=("test_schema", "test_faketensor"))


def test_ops_are_registered_custom_ops_that_trace_as_one_node():
    """Eager calls skip the dispatcher; under torch.compile the op is one opaque kiln node."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    x, w = torch.randn(3, 4), torch.randn(6, 4)
    out = torch.compile(lambda a, b: ops.silu_and_mul(ops.linear(a, b)), backend=backend, fullgraph=True)(x, w)
    torch.testing.assert_close(out, ops.silu_and_mul(ops.linear(x, w)))
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert targets == ["kiln.linear.default", "kiln.silu_and_mul.default"]


def test_norms_match_hf():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x, r = torch.randn(7, 32, dtype=torch.bfloat16), torch.randn(7, 32, dtype=torch.bfloat16)
    hf = LlamaRMSNorm(32, eps=1e-5).to(torch.bfloat16)
    torch.nn.init.normal_(hf.weight)
    torch.testing.assert_close(ops.rms_norm(x, hf.weight, 1e-5), hf(x), atol=0, rtol=0)
    out, summed = ops.add_rms_norm(x, r, hf.weight, 1e-5)
    torch.testing.assert_close(summed, x + r, atol=0, rtol=0)
    torch.testing.assert_close(out, hf(x + r), atol=0, rtol=0)


def test_silu_and_mul():
    x = torch.randn(4, 10)
    torch.testing.assert_close(ops.silu_and_mul(x), F.silu(x[:, :5]) * x[:, 5:])


@pytest.mark.parametrize("rotary_dim", [16, 8])  # full and partial rotary
def test_rotary_neox_matches_hf(rotary_dim):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    T, D = 6, 16
    q, k = torch.randn(T, 4, D), torch.randn(T, 2, D)
    positions = torch.tensor([0, 3, 1, 7, 2, 9])
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    freqs = torch.arange(16).float()[:, None] * inv_freq
    cache = torch.cat((freqs.cos(), freqs.sin()), -1)
    emb = torch.cat((freqs, freqs), -1)[positions]
    cos, sin = emb.cos()[None], emb.sin()[None]
    hq, hk = apply_rotary_pos_emb(q[..., :rotary_dim].transpose(0, 1)[None], k[..., :rotary_dim].transpose(0, 1)[None], cos, sin)
    oq, ok = ops.rotary(q, k, positions, cache, True)
    torch.testing.assert_close(oq[..., :rotary_dim], hq[0].transpose(0, 1))
    torch.testing.assert_close(ok[..., :rotary_dim], hk[0].transpose(0, 1))
    torch.testing.assert_close(oq[..., rotary_dim:], q[..., rotary_dim:], atol=0, rtol=0)


def test_rotary_gptj_rotates_pairs():
    q = torch.randn(1, 1, 4)
    cache = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.5, 0.25, 0.3, 0.7]])
    cos, sin = cache[1, :2], cache[1, 2:]
    oq, _ = ops.rotary(q, q.clone(), torch.tensor([1]), cache, False)
    x = q[0, 0]
    expect = torch.stack([x[0] * cos[0] - x[1] * sin[0], x[1] * cos[0] + x[0] * sin[0],
                          x[2] * cos[1] - x[3] * sin[1], x[3] * cos[1] + x[2] * sin[1]])
    torch.testing.assert_close(oq[0, 0], expect)


def dense_attention(q, k, v, scale, window, causal=True):
    """One sequence, no cache: q [Q, H, D] are the last Q of the K positions."""
    Q, H, _ = q.shape
    K, Hkv, _ = k.shape
    k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    qp, kp = torch.arange(K - Q, K)[:, None], torch.arange(K)[None, :]
    allowed = (kp <= qp) if causal else torch.ones(Q, K, dtype=torch.bool)
    if window:
        allowed &= qp - kp < window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@pytest.mark.parametrize("window", [0, 5])
def test_paged_attention_matches_dense(window):
    """Three sequences with context already cached, each computing some new tokens (one a decode),
    with scattered block tables: equal to dense attention over each whole sequence."""
    torch.manual_seed(0)
    H, Hkv, D, bs, num_blocks = 4, 2, 8, 4, 32
    k_cache, v_cache = torch.zeros(num_blocks, bs, Hkv, D), torch.zeros(num_blocks, bs, Hkv, D)
    seq_lens, query_lens = [11, 6, 9], [3, 6, 1]
    perm = torch.randperm(num_blocks).tolist()
    tables, slots, qs, ks, vs, full = [], [], [], [], [], []
    for L, n in zip(seq_lens, query_lens):
        blocks = [perm.pop() for _ in range(-(-L // bs))]
        tables.append(blocks + [0] * (3 - len(blocks)))
        k_all, v_all = torch.randn(L, Hkv, D), torch.randn(L, Hkv, D)
        for p in range(L - n):  # earlier context, already in the cache
            k_cache[blocks[p // bs], p % bs], v_cache[blocks[p // bs], p % bs] = k_all[p], v_all[p]
        slots += [blocks[p // bs] * bs + p % bs for p in range(L - n, L)]
        q = torch.randn(n, H, D)
        qs.append(q), ks.append(k_all[L - n:]), vs.append(v_all[L - n:]), full.append((q, k_all, v_all))
    md = AttentionMetadata(torch.tensor(slots), torch.tensor(tables), query_lens, seq_lens, bs)
    with set_forward_context(ForwardContext(md, [(k_cache, v_cache)])):
        out = ops.attention(torch.cat(qs), torch.cat(ks), torch.cat(vs), 0, 0.3, window)
    expect = torch.cat([dense_attention(q, k, v, 0.3, window) for q, k, v in full])
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5)


def test_bidirectional_attention_without_cache():
    torch.manual_seed(0)
    q, k, v = torch.randn(7, 2, 4), torch.randn(7, 2, 4), torch.randn(7, 2, 4)
    md = AttentionMetadata(torch.zeros(0, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long), [3, 4], [3, 4], 16)
    with set_forward_context(ForwardContext(md, None)):
        out = ops.attention(q, k, v, 0, 0.5, 0, False)
    expect = torch.cat([dense_attention(q[:3], k[:3], v[:3], 0.5, 0, False), dense_attention(q[3:], k[3:], v[3:], 0.5, 0, False)])
    torch.testing.assert_close(out, expect)


def test_attention_outside_a_forward_context_is_a_clear_error():
    x = torch.randn(2, 1, 4)
    with pytest.raises(RuntimeError, match="outside a forward context"):
        ops.attention(x, x, x, 0, 1.0)


def test_soft_capped_attention_matches_a_dense_formula():
    """Gemma 2's soft-cap: scores become cap * tanh(score / cap) before the softmax."""
    torch.manual_seed(torch.randint(0, 2**31, ()).item())
    q, k, v = torch.randn(5, 4, 8) * 3, torch.randn(5, 2, 8) * 3, torch.randn(5, 2, 8)
    md = AttentionMetadata(torch.zeros(0, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long), [5], [5], 16)
    with set_forward_context(ForwardContext(md, None)):
        out = ops.attention(q, k, v, 0, 0.5, 0, True, 2.0)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    scores = 2.0 * torch.tanh(torch.einsum("qhd,khd->hqk", q, kk) * 0.5 / 2.0)
    scores = scores.masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf"))
    expect = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vv)
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5)
    with set_forward_context(ForwardContext(md, None)):
        uncapped = ops.attention(q, k, v, 0, 0.5, 0, True, 0.0)
    assert not torch.allclose(out, uncapped, atol=1e-3)  # the cap did something at these magnitudes
