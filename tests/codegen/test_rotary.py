"""Rotary kernels (alone and fused with the KV-cache write) against the reference op."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot run")

from kiln.codegen.kernels import rotary, rotary_kv_cache  # noqa: E402
from kiln.ir import ops  # noqa: E402

MAX_POS = 64


def _cos_sin_cache(rotary_dim: int, device) -> torch.Tensor:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, device=device).float() / rotary_dim))
    freqs = torch.arange(MAX_POS, device=device).float()[:, None] * inv_freq * torch.rand((), device=device).add(0.5)
    return torch.cat((freqs.cos(), freqs.sin()), -1)


# (T, H, Hkv, D, rotary_dim): GQA 1 and 4, full and partial rotary, a head dim that is not a power of two
CASES = [(5, 4, 4, 32, 32), (7, 8, 2, 32, 16), (3, 4, 1, 48, 32)]


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T, H, Hkv, D, rot", CASES)
def test_rotary(T, H, Hkv, D, rot, dtype, is_neox, device, poisoned, close):
    q = torch.randn(T, H, D, device=device).to(dtype)
    k = torch.randn(T, Hkv, D, device=device).to(dtype)
    positions = torch.randint(0, MAX_POS, (T,), device=device)
    cache = _cos_sin_cache(rot, device)
    out_q, out_k = poisoned(rotary, q, k, positions, cache, is_neox)
    ref_q, ref_k = ops.rotary(q, k, positions, cache, is_neox)
    close(out_q, ref_q)
    close(out_k, ref_k)


def test_rotary_strided_heads_int32_positions(device, poisoned, close):
    """q and k as views into one fused qkv projection output, as a merged QKV linear leaves them."""
    T, H, Hkv, D = 6, 4, 2, 32
    qkv = torch.randn(T, (H + 2 * Hkv) * D, device=device)
    q = qkv[:, : H * D].unflatten(-1, (H, D))
    k = qkv[:, H * D: (H + Hkv) * D].unflatten(-1, (Hkv, D))
    positions = torch.randint(0, MAX_POS, (T,), device=device, dtype=torch.int32)
    cache = _cos_sin_cache(D, device)
    out_q, out_k = poisoned(rotary, q, k, positions, cache, True)
    ref_q, ref_k = ops.rotary(q, k, positions.long(), cache, True)
    close(out_q, ref_q)
    close(out_k, ref_k)


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_kv_cache(dtype, is_neox, device, poisoned, close):
    """The fused variant returns what rotary returns and writes rotated k and v at the slots,
    leaving every other cache entry alone and skipping padding slots (-1)."""
    T, H, Hkv, D, rot, num_blocks, block_size = 6, 8, 2, 48, 32, 6, 4
    q = torch.randn(T, H, D, device=device).to(dtype)
    k = torch.randn(T, Hkv, D, device=device).to(dtype)
    v = torch.randn(T, Hkv, D, device=device).to(dtype)
    positions = torch.randint(0, MAX_POS, (T,), device=device)
    cache = _cos_sin_cache(rot, device)
    slots = torch.randperm(num_blocks * block_size, device=device)[:T]
    slots[-1] = -1
    k_cache = torch.randn(num_blocks, block_size, Hkv, D, device=device).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, Hkv, D, device=device).to(dtype)
    ref_k_cache, ref_v_cache = k_cache.clone(), v_cache.clone()

    out_q, out_k = poisoned(rotary_kv_cache, q, k, v, positions, cache, is_neox, k_cache, v_cache, slots)
    ref_q, ref_k = ops.rotary(q, k, positions, cache, is_neox)
    close(out_q, ref_q)
    close(out_k, ref_k)
    ref_k_cache.flatten(0, 1)[slots[:-1]] = ref_k[:-1]
    ref_v_cache.flatten(0, 1)[slots[:-1]] = v[:-1]
    close(k_cache, ref_k_cache)
    torch.testing.assert_close(v_cache, ref_v_cache, rtol=0, atol=0)


@pytest.mark.parametrize("is_neox", [True, False])
def test_rotary_in_place_on_a_projections_views(is_neox, device, close):
    """rotary_in_place rotates q and k where they are: head views of one [T, (H + 2 Hkv) D]
    projection (token stride wider than the heads), as rotary does on copies; v is untouched."""
    from kiln.codegen.kernels.rotary import rotary_in_place

    T, H, Hkv, D = 5, 4, 2, 32
    qkv = torch.randn(T, (H + 2 * Hkv) * D, device=device)
    before = qkv.clone()
    q, k = qkv[:, :H * D].unflatten(-1, (H, D)), qkv[:, H * D:(H + Hkv) * D].unflatten(-1, (Hkv, D))
    positions = torch.randint(0, MAX_POS, (T,), device=device)
    cache = _cos_sin_cache(D, device)
    ref_q, ref_k = ops.rotary(q.clone(), k.clone(), positions, cache, is_neox)
    rotary_in_place(q, k, positions, cache, is_neox)
    close(q, ref_q)
    close(k, ref_k)
    assert torch.equal(qkv[:, (H + Hkv) * D:], before[:, (H + Hkv) * D:])
