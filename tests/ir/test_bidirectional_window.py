"""Bidirectional sliding window: with causal=False a window W keeps |q_pos - k_pos| <= W // 2
(ModernBERT's local attention); the causal window is unchanged."""

from __future__ import annotations

import pytest
import torch

from kiln.ir import AttentionMetadata, ForwardContext, ops, set_forward_context


def dense_window_attention(q, k, v, scale, window):
    """One whole sequence, q/k/v [L, H, D], each query seeing the keys within window // 2 of it."""
    L = q.shape[0]
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    pos = torch.arange(L)
    allowed = (pos[:, None] - pos[None, :]).abs() <= window // 2
    return torch.einsum("hqk,khd->qhd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), v)


@pytest.mark.parametrize("window", [1, 4, 7, 8, 64])
def test_bidirectional_window_matches_dense(window):
    torch.manual_seed(0)
    lens = [3, 17, 9]
    q, k, v = (torch.randn(sum(lens), 2, 8) for _ in range(3))
    md = AttentionMetadata(torch.zeros(0, dtype=torch.long), torch.zeros(len(lens), 1, dtype=torch.long), lens, lens, 16)
    with set_forward_context(ForwardContext(md, None)):
        out = ops.attention(q, k, v, 0, 0.4, window, False)
    bounds = torch.tensor([0, *lens]).cumsum(0).tolist()
    expect = torch.cat([dense_window_attention(q[a:b], k[a:b], v[a:b], 0.4, window) for a, b in zip(bounds, bounds[1:])])
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5)


def test_window_masks():
    pos = torch.arange(6)
    bidirectional = ops._mask(pos, pos, False, 4)
    assert bidirectional.tolist() == [[abs(i - j) <= 2 for j in range(6)] for i in range(6)]
    causal = ops._mask(pos, pos, True, 4)
    assert causal.tolist() == [[0 <= i - j < 4 for j in range(6)] for i in range(6)]
    assert ops._mask(pos, pos, False, 0).all()
