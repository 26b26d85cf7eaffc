"""`ops.attention` with attention sinks (GPT-OSS) and with a value head dim different from the
query/key one (multi-head latent attention), on every path: paged prefill and decode, and the
padded no-cache path pooling steps take."""

from __future__ import annotations

import types

import pytest
import torch

from kiln.ir import AttentionMetadata, ForwardContext, ops, set_forward_context

H, HKV, D, DV, BS = 4, 2, 8, 6, 4


def dense(q, k, v, scale, sinks=None, causal=True):
    """One sequence: q [Q, H, D] are the last Q of the K positions; k [K, Hkv, D], v [K, Hkv, Dv]."""
    Q, K = q.shape[0], k.shape[0]
    k, v = k.repeat_interleave(H // HKV, 1), v.repeat_interleave(H // HKV, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    if causal:
        allowed = torch.arange(K)[None, :] <= torch.arange(K - Q, K)[:, None]
        scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks is not None:  # one more logit per head, its weight dropped
        scores = torch.cat((scores, sinks[:, None, None].expand(H, Q, 1)), -1)
        return torch.einsum("hqk,khd->qhd", scores.softmax(-1)[..., :-1], v)
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@pytest.mark.parametrize("sinks", [None, torch.tensor([0.5, -1.0, 2.0, 0.0])], ids=["no-sinks", "sinks"])
def test_paged_attention_with_sinks_and_value_dim(sinks):
    """Three sequences with cached context, one a decode, scattered blocks; v is DV wide."""
    torch.manual_seed(0)
    num_blocks = 32
    k_cache, v_cache = torch.zeros(num_blocks, BS, HKV, D), torch.zeros(num_blocks, BS, HKV, DV)
    seq_lens, query_lens = [11, 6, 9], [3, 6, 1]
    perm = torch.randperm(num_blocks).tolist()
    tables, slots, qs, ks, vs, expect = [], [], [], [], [], []
    for L, n in zip(seq_lens, query_lens):
        blocks = [perm.pop() for _ in range(-(-L // BS))]
        tables.append(blocks + [0] * (3 - len(blocks)))
        k_all, v_all, q = torch.randn(L, HKV, D), torch.randn(L, HKV, DV), torch.randn(n, H, D)
        for p in range(L - n):  # earlier context, already in the cache
            k_cache[blocks[p // BS], p % BS], v_cache[blocks[p // BS], p % BS] = k_all[p], v_all[p]
        slots += [blocks[p // BS] * BS + p % BS for p in range(L - n, L)]
        qs.append(q), ks.append(k_all[L - n:]), vs.append(v_all[L - n:])
        expect.append(dense(q, k_all, v_all, 0.3, sinks))
    md = AttentionMetadata(torch.tensor(slots), torch.tensor(tables), query_lens, seq_lens, BS)
    with set_forward_context(ForwardContext(md, [(k_cache, v_cache)])):
        out = ops.attention(torch.cat(qs), torch.cat(ks), torch.cat(vs), 0, 0.3, 0, True, 0.0, sinks)
    assert out.shape == (sum(query_lens), H, DV)
    torch.testing.assert_close(out, torch.cat(expect), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_padded_attention_with_sinks_and_value_dim(causal):
    """Whole sequences, no cache (a pooling step): the padded batched path."""
    torch.manual_seed(0)
    lens, sinks = [3, 7, 5], torch.tensor([1.0, -0.5, 0.25, 3.0])
    q, k, v = torch.randn(sum(lens), H, D), torch.randn(sum(lens), HKV, D), torch.randn(sum(lens), HKV, DV)
    no_slots, no_tables = torch.zeros(0, dtype=torch.long), torch.zeros(len(lens), 1, dtype=torch.long)
    md = AttentionMetadata(no_slots, no_tables, lens, lens, 16)
    with set_forward_context(ForwardContext(md, None)):
        out = ops.attention(q, k, v, 0, 0.4, 0, causal, 0.0, sinks)
    bounds = torch.tensor([0, *lens]).cumsum(0).tolist()
    expect = torch.cat([dense(q[a:b], k[a:b], v[a:b], 0.4, sinks, causal) for a, b in zip(bounds, bounds[1:])])
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5)


def test_sinks_match_gpt_oss():
    """The sink semantics are GPT-OSS's own (transformers' eager attention for it)."""
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    torch.manual_seed(0)
    T = 6
    q, k, v, sinks = torch.randn(T, H, D), torch.randn(T, HKV, D), torch.randn(T, HKV, D), torch.randn(H)
    module = types.SimpleNamespace(num_key_value_groups=H // HKV, sinks=sinks, training=False)
    causal_mask = torch.full((T, T), float("-inf")).triu(1)
    ref, _ = eager_attention_forward(module, *(t.transpose(0, 1)[None] for t in (q, k, v)), causal_mask, 0.5)
    md = AttentionMetadata(torch.zeros(0, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long), [T], [T], 16)
    with set_forward_context(ForwardContext(md, None)):
        out = ops.attention(q, k, v, 0, 0.5, 0, True, 0.0, sinks)
    torch.testing.assert_close(out, ref[0], atol=1e-5, rtol=1e-5)


def test_fake_attention_has_the_value_head_dim():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k, v = torch.empty(5, H, D), torch.empty(5, HKV, D), torch.empty(5, HKV, DV)
        out = ops.attention.op(q, k, v, 0, 1.0, 0, True, 0.0, torch.empty(H))
    assert out.shape == (5, H, DV)
