"""The Triton kernels with an fp8 KV cache (float8_e4m3fn, per-layer k_scale / v_scale) against the
reference ops: the cache writes (alone and fused with rotary) store the same bytes as
`kiln.ir.ops.quantize_kv`, and decode / prefill attention over fp8 caches give the reference's
output (which dequantizes the cache to q's dtype) within the dtype's tolerances."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot run")

from kiln.codegen import triton_ops  # noqa: E402
from kiln.codegen.kernels import decode_attention, prefill_attention, rotary_kv_cache, write_kv_cache  # noqa: E402
from kiln.ir import AttentionMetadata, ForwardContext, ops, set_forward_context  # noqa: E402

FP8 = torch.float8_e4m3fn


def random_scales() -> tuple[float, float]:
    """(k_scale, v_scale) away from 1, so a scale applied twice or not at all shows."""
    return tuple(float(s) for s in torch.empty(2).uniform_(0.02, 0.2))


def fp8_batch(query_lens, seq_lens, Hkv, D, block_size, k_scale, v_scale, device):
    """A step's metadata over fp8 caches already holding every sequence's context (scattered blocks,
    tables padded with 0): N(0, 4) values quantized with the scales, a few of them saturated."""
    blocks_each = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_each) + 2
    pool = torch.randperm(num_blocks).tolist()
    tables = torch.zeros(len(seq_lens), max(blocks_each), dtype=torch.long)
    slots = []
    for i, (q_len, seq_len) in enumerate(zip(query_lens, seq_lens)):
        row = [pool.pop() for _ in range(blocks_each[i])]
        tables[i, :len(row)] = torch.tensor(row)
        slots += [row[p // block_size] * block_size + p % block_size for p in range(seq_len - q_len, seq_len)]
    md = AttentionMetadata(slot_mapping=torch.tensor(slots, device=device), block_tables=tables.to(device),
                           query_lens=list(query_lens), seq_lens=list(seq_lens), block_size=block_size)
    k_cache = ops.quantize_kv(torch.randn(num_blocks, block_size, Hkv, D, device=device) * 4 * k_scale, k_scale)
    v_cache = ops.quantize_kv(torch.randn(num_blocks, block_size, Hkv, D, device=device) * 4 * v_scale, v_scale)
    return md, k_cache, v_cache


def reference(q, md, k_cache, v_cache, scale, k_scale, v_scale, window=0):
    """ops.attention over caches already written (kv_written=True: k and v only give shapes)."""
    kv = q.new_zeros((q.shape[0], *k_cache.shape[2:]))
    with set_forward_context(ForwardContext(md, [(k_cache, v_cache)], kv_scales=[(k_scale, v_scale)])):
        return ops.attention(q, kv, kv, 0, scale, window, kv_written=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_cache_fp8(dtype, device):
    """x / scale clamped to +-448 and rounded to nearest even, byte for byte as the reference;
    padding slots (-1) and every other slot left alone."""
    T, Hkv, D, Dv, block_size, num_blocks = 9, 2, 40, 24, 4, 5
    k_scale, v_scale = random_scales()
    k = (torch.randn(T, Hkv, D, device=device) * 20 * k_scale).to(dtype)  # some beyond 448 * k_scale: saturate
    v = (torch.randn(T, Hkv, Dv, device=device) * 4 * v_scale).to(dtype)
    k[0, 0, :4] = torch.tensor([1e4, -1e4, 0.0, -0.0])
    slots = torch.randperm(num_blocks * block_size, device=device)[:T]
    slots[3] = -1
    k_cache = ops.quantize_kv(torch.randn(num_blocks, block_size, Hkv, D, device=device), 1.0)
    v_cache = ops.quantize_kv(torch.randn(num_blocks, block_size, Hkv, Dv, device=device), 1.0)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    write_kv_cache(k, v, k_cache, v_cache, slots, k_scale, v_scale)
    keep = slots >= 0
    ops._write_kv(k[keep], v[keep], ref_k, ref_v, slots[keep], k_scale, v_scale)
    assert k_cache.dtype == FP8 and ref_k.float().abs().max() == 448.0
    assert torch.equal(k_cache.view(torch.uint8), ref_k.view(torch.uint8))
    assert torch.equal(v_cache.view(torch.uint8), ref_v.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_kv_cache_fp8(dtype, device, poisoned, close):
    """The fused rotary + cache write: rotated q and k as the reference, and the cache holding
    exactly quantize_kv of the rotated k the kernel returns (which is within the dtype's tolerance
    of the reference's, not equal to it: one fp8 step is 6-12%) and of v."""
    T, H, Hkv, D, rot, num_blocks, block_size = 6, 4, 2, 32, 16, 4, 4
    k_scale, v_scale = random_scales()
    q = torch.randn(T, H, D, device=device).to(dtype)
    k = (torch.randn(T, Hkv, D, device=device) * 4 * k_scale).to(dtype)
    v = (torch.randn(T, Hkv, D, device=device) * 4 * v_scale).to(dtype)
    positions = torch.randint(0, 64, (T,), device=device)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot, 2, device=device).float() / rot))
    freqs = torch.arange(64, device=device).float()[:, None] * inv_freq
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), -1)
    slots = torch.randperm(num_blocks * block_size, device=device)[:T]
    slots[-1] = -1
    k_cache = torch.zeros(num_blocks, block_size, Hkv, D, device=device, dtype=FP8)
    v_cache = torch.zeros(num_blocks, block_size, Hkv, D, device=device, dtype=FP8)
    ref_k_cache, ref_v_cache = k_cache.clone(), v_cache.clone()
    out_q, out_k = poisoned(rotary_kv_cache, q, k, v, positions, cos_sin, True, k_cache, v_cache, slots,
                            k_scale, v_scale)
    ref_q, ref_k = ops.rotary(q, k, positions, cos_sin, True)
    close(out_q, ref_q)
    close(out_k, ref_k)
    ops._write_kv(out_k[:-1], v[:-1], ref_k_cache, ref_v_cache, slots[:-1], k_scale, v_scale)
    assert torch.equal(k_cache.view(torch.uint8), ref_k_cache.view(torch.uint8))
    assert torch.equal(v_cache.view(torch.uint8), ref_v_cache.view(torch.uint8))


HEADS = [(4, 4), (8, 2)]  # (H, Hkv): GQA ratios 1 and 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_splits, early_kv", [(1, False), (3, False), (3, True)])
@pytest.mark.parametrize("H, Hkv", HEADS)
def test_decode_attention_fp8(H, Hkv, num_splits, early_kv, dtype, device, poisoned, close):
    k_scale, v_scale = random_scales()
    seq_lens = [1, 9, 23]
    md, k_cache, v_cache = fp8_batch([1, 1, 1], seq_lens, Hkv, 32, 4, k_scale, v_scale, device)
    q = torch.randn(3, H, 32, device=device).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    out = poisoned(decode_attention, q, k_cache, v_cache, md.block_tables, lens, 0.3, num_splits=num_splits,
                   block_n=16, k_scale=k_scale, v_scale=v_scale, early_kv=early_kv)
    close(out, reference(q, md, k_cache, v_cache, 0.3, k_scale, v_scale))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [0, 6])
def test_prefill_attention_fp8(window, dtype, device, poisoned, close):
    """A whole prompt, a decode token and a chunk with cached context before it, GQA 4."""
    k_scale, v_scale = random_scales()
    query_lens, seq_lens = [11, 1, 7], [11, 14, 19]
    md, k_cache, v_cache = fp8_batch(query_lens, seq_lens, 2, 32, 4, k_scale, v_scale, device)
    q = torch.randn(sum(query_lens), 8, 32, device=device).to(dtype)
    qsl = torch.tensor([0, 11, 12, 19], dtype=torch.int32, device=device)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    out = poisoned(prefill_attention, q, k_cache, v_cache, qsl, lens, max(query_lens), 0.3, md.block_tables, True,
                   window, block_m=16, block_n=16, k_scale=k_scale, v_scale=v_scale)
    close(out, reference(q, md, k_cache, v_cache, 0.3, k_scale, v_scale, window))


@pytest.mark.parametrize("step", [([1, 1], [6, 13]), ([5, 1], [9, 13])])
def test_attention_op_fp8(step, device, poisoned, close):
    """kiln::attention's CUDA implementation in a forward context with fp8 caches and scales: the
    same caches after the step's write, the same output as the reference."""
    query_lens, seq_lens = step
    k_scale, v_scale = random_scales()
    md, k_cache, v_cache = fp8_batch(query_lens, seq_lens, 2, 16, 4, k_scale, v_scale, device)
    T = sum(query_lens)
    q = torch.randn(T, 4, 16, device=device)
    k, v = torch.randn(T, 2, 16, device=device) * 4 * k_scale, torch.randn(T, 2, 16, device=device) * 4 * v_scale
    ref_caches = [(k_cache.clone(), v_cache.clone())]
    with set_forward_context(ForwardContext(md, [(k_cache, v_cache)], kv_scales=[(k_scale, v_scale)])):
        out = poisoned(triton_ops.attention, q, k, v, 0, 0.25)
    with set_forward_context(ForwardContext(md, ref_caches, kv_scales=[(k_scale, v_scale)])):
        ref = ops.attention(q, k, v, 0, 0.25)
    assert torch.equal(k_cache.view(torch.uint8), ref_caches[0][0].view(torch.uint8))
    assert torch.equal(v_cache.view(torch.uint8), ref_caches[0][1].view(torch.uint8))
    close(out, ref)
