"""`qkv_attention`: the q/k/v gemv and the token's decode attention in one launch, against the two
launches apart (`rope_gemv`, then `decode_attention` on its q) on the same inputs."""

from __future__ import annotations

import importlib

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot run")

from kiln.codegen.kernels import quant_gemm  # noqa: E402
from kiln.codegen.kernels.qkv_attention import qkv_attention  # noqa: E402
from kiln.codegen.kernels.quant_gemm import GPTJ, NEOX, GemmConfig, Rope  # noqa: E402

decode_module = importlib.import_module("kiln.codegen.kernels.decode_attention")

BLOCK_SIZE, NUM_BLOCKS, WIDTH, MAX_POS = 4, 24, 20, 128
H, HKV, D, K = 4, 2, 32, 64


def _case(seq_len: int, style: int, device):
    """The inputs of one step of one sequence seq_len tokens long (this step's token the last),
    and a copy of its caches for the reference."""
    dtype = torch.bfloat16
    x, residual = (torch.randn(1, K, device=device).to(dtype) for _ in range(2))
    g = (torch.rand(K, device=device) + 0.5).to(dtype)
    w = (torch.randn((H + 2 * HKV) * D, K, device=device) * 0.125).to(dtype)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2, device=device).float() / D))
    freqs = torch.arange(MAX_POS, device=device).float()[:, None] * inv_freq
    cs = torch.cat((freqs.cos(), freqs.sin()), -1)
    table = torch.randperm(NUM_BLOCKS)[:WIDTH].to(device=device, dtype=torch.int32)[None]
    pos = seq_len - 1
    slot = int(table[0, pos // BLOCK_SIZE]) * BLOCK_SIZE + pos % BLOCK_SIZE
    caches = [torch.randn(NUM_BLOCKS, BLOCK_SIZE, HKV, D, device=device).to(dtype) for _ in range(2)]
    ref_caches = [c.clone() for c in caches]
    where = (torch.tensor([pos], device=device), cs, torch.tensor([slot], device=device))
    rope = Rope(style, where[0], cs, where[2], *caches, H, HKV, D)
    ref_rope = Rope(style, where[0], cs, where[2], *ref_caches, H, HKV, D)
    seq_lens = torch.tensor([seq_len], device=device, dtype=torch.int32)
    return x, residual, g, w, rope, ref_rope, table, seq_lens


@pytest.mark.parametrize("seq_len, num_splits, block_n, early_kv", [(1, 1, 16, False), (9, 3, 16, True),
                                                                    (40, 8, 16, False), (70, 3, 32, True),
                                                                    (70, 1, 128, True)])
@pytest.mark.parametrize("newest_row", [True, False])
def test_qkv_attention_is_rope_gemv_then_decode_attention(seq_len, num_splits, block_n, early_kv, newest_row, device,
                                                          poisoned, monkeypatch):
    """The same projection, sum and caches bit for bit, and the same attention, over contexts of 1
    to 70 keys on one to eight splits (empty ones too), this step's token read as a row or a tile;
    every count back at zero after."""
    monkeypatch.setattr(decode_module, "NEWEST_ROW", newest_row)
    x, residual, g, w, rope, ref_rope, table, seq_lens = _case(seq_len, NEOX, device)
    cfg = GemmConfig("gemv", 1, 8, 32)
    qkv, summed, out = poisoned(qkv_attention, x, residual, g, 1e-5, w, None, rope, table, seq_lens, 0.2,
                                num_splits=num_splits, block_n=block_n, early_kv=early_kv, config=cfg)
    ref_qkv, ref_summed = quant_gemm.rope_gemv(x, residual, g, 1e-5, w, None, ref_rope, config=cfg)
    ref_out = decode_module.decode_attention(ref_qkv[:, :H * D].view(1, H, D), ref_rope.k_cache, ref_rope.v_cache,
                                             table, seq_lens, 0.2, num_splits=num_splits, block_n=block_n,
                                             early_kv=early_kv)
    assert torch.equal(qkv, ref_qkv) and torch.equal(summed, ref_summed)
    assert torch.equal(rope.k_cache, ref_rope.k_cache) and torch.equal(rope.v_cache, ref_rope.v_cache)
    assert out.shape == (1, H, D) and torch.equal(out, ref_out)
    assert not decode_module._counter_buffers[out.device][:2 * HKV].any()


def test_qkv_attention_gptj_and_defaults(device, poisoned, close):
    """GPT-J pairs, no residual, the default splits and tiles: the attention of the rotated q over the
    cache with this step's k and v in it, against a dense softmax."""
    x, _, g, w, rope, ref_rope, table, seq_lens = _case(23, GPTJ, device)
    qkv, summed, out = poisoned(qkv_attention, x, None, g, 1e-5, w, None, rope, table, seq_lens, 0.2)
    assert summed is None
    q = qkv[0, :H * D].view(H, D).float()
    keys = rope.k_cache[table[0].long()].flatten(0, 1)[:23].float()  # [23, HKV, D], in the table's order
    values = rope.v_cache[table[0].long()].flatten(0, 1)[:23].float()
    kv_of = torch.arange(H, device=device) // (H // HKV)
    scores = torch.einsum("hd,nhd->hn", q, keys[:, kv_of]) * 0.2
    ref = torch.einsum("hn,nhd->hd", scores.softmax(-1), values[:, kv_of])
    close(out[0].float(), ref, dtype=torch.bfloat16)


def test_qkv_attention_refuses_what_it_cannot_do(device):
    x, _, g, w, rope, _, table, seq_lens = _case(5, NEOX, device)
    fp8 = Rope(NEOX, rope.position, rope.cos_sin_cache, rope.slot,
               *(c.to(torch.float8_e4m3fn) for c in (rope.k_cache, rope.v_cache)), H, HKV, D)
    with pytest.raises(ValueError, match="bf16 or fp16 caches only"):
        qkv_attention(x, None, g, 1e-5, w, None, fp8, table, seq_lens, 0.2)
    with pytest.raises(ValueError, match="one sequence"):
        qkv_attention(x, None, g, 1e-5, w, None, rope, table.expand(2, -1), seq_lens.expand(2), 0.2)


@pytest.mark.parametrize("H, HKV, D, DV, block_n", [(4, 2, 32, 32, 8), (32, 8, 64, 64, 8), (16, 4, 128, 128, 4),
                                                    (8, 8, 64, 32, 8)])
def test_each_kv_head_counts_the_programs_that_store_its_columns(H, HKV, D, DV, block_n):
    """`quant_gemm._arrivals` (the count a kv head's attention programs wait for) is how many of
    the gemv's programs `handoff_arrive` counts in for each kv head: the columns [q heads | k heads
    | v heads] in tiles of block_n rows, mapped as the kernel maps a program's first row."""
    QD, KD = H * D, HKV * D
    group = H // HKV
    counts = [0] * HKV
    for pid in range((QD + KD + HKV * DV) // block_n):
        first = pid * block_n
        kvh = first // D // group if first < QD else (first - QD) // D if first < QD + KD else (first - QD - KD) // DV
        counts[kvh] += 1
    caches = [torch.zeros(1, 1, HKV, d) for d in (D, DV)]
    rope = Rope(NEOX, torch.zeros(1), torch.zeros(1, D), torch.zeros(1), *caches, H, HKV, D)
    assert counts == [quant_gemm._arrivals(rope, block_n)] * HKV


@pytest.mark.parametrize("counters", [True, False])
def test_the_fused_op_on_triton_takes_one_launch_with_the_switch(counters, device, monkeypatch, close):
    """`triton_ops.add_rms_norm_linear_rope_attention` (the op fuse_rope_attention makes) on a
    one-sequence decode step: with `qkv_attention.HANDOFF` one `qkv_attention` launch, without it
    the projection's and the attention's: the same projection, sum and caches, and the same
    attention up to bf16's rounding (the two take other key tiles by default, so other splits).
    Without its counters (a capture with no run before it) the switch keeps the two launches."""
    from kiln.codegen import triton_ops
    from kiln.codegen.kernels import qkv_attention as module
    from kiln.ir import AttentionMetadata, ForwardContext, set_forward_context

    x, residual, g, w, rope, ref_rope, table, _ = _case(23, NEOX, device)
    calls = []
    real = module.qkv_attention
    monkeypatch.setattr(module, "qkv_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    if not counters:
        monkeypatch.setattr(decode_module, "_counters", lambda device, n: None)
    results = {}
    triton_ops.set_float_gemv(True)
    try:
        for handoff, r in ((True, rope), (False, ref_rope)):
            monkeypatch.setattr(module, "HANDOFF", handoff)
            md = AttentionMetadata(r.slot, table.long(), [1], [23], BLOCK_SIZE)
            with set_forward_context(ForwardContext(md, [(r.k_cache, r.v_cache)])):
                results[handoff] = triton_ops.add_rms_norm_linear_rope_attention(
                    x, residual, g, 1e-5, [w[:H * D], w[H * D:]], [], None, r.position, r.cos_sin_cache, True, 0, H,
                    HKV, D, 0.2)
    finally:
        triton_ops.set_float_gemv(False)
    assert calls == ([1] if counters else [])
    (qkv, summed, out), (ref_qkv, ref_summed, ref_out) = results[True], results[False]
    assert torch.equal(qkv, ref_qkv) and torch.equal(summed, ref_summed)
    assert out.shape == ref_out.shape == (1, H, D)
    close(out, ref_out, dtype=torch.bfloat16)
    assert torch.equal(rope.k_cache, ref_rope.k_cache) and torch.equal(rope.v_cache, ref_rope.v_cache)


def test_qkv_attention_with_8bit_weights(device, poisoned):
    """int8 weight-only weights (the 8-bit gemv's tile: 4 warps, so the attention's 16-key tiles):
    the same projection, caches and attention as the two launches apart."""
    from kiln.ir import quant_ops as Q

    x, residual, g, _, rope, ref_rope, table, seq_lens = _case(40, NEOX, device)
    w, w_scale = Q.quantize_weight(torch.randn((H + 2 * HKV) * D, K, device=device) * 0.125, "int8")
    qkv, summed, out = poisoned(qkv_attention, x, residual, g, 1e-5, w, None, rope, table, seq_lens, 0.2,
                                w_scale=w_scale)
    ref_qkv, ref_summed = quant_gemm.rope_gemv(x, residual, g, 1e-5, w, None, ref_rope, w_scale=w_scale)
    ref_out = decode_module.decode_attention(ref_qkv[:, :H * D].view(1, H, D), ref_rope.k_cache, ref_rope.v_cache,
                                             table, seq_lens, 0.2, block_n=16)
    assert torch.equal(qkv, ref_qkv) and torch.equal(summed, ref_summed)
    assert torch.equal(rope.k_cache, ref_rope.k_cache) and torch.equal(rope.v_cache, ref_rope.v_cache)
    assert torch.equal(out, ref_out)
