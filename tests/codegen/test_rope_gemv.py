"""The q/k/v gemv with the rotary epilogue (`quant_gemm.rope_gemv`) against the reference ops it
replaces (`rms_norm_linear_rope` / `add_rms_norm_linear_rope`: the norm + linear, then
rotary_kv_write), and the dispatch of those ops' CUDA implementations."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot run")

from kiln.codegen import triton_ops  # noqa: E402
from kiln.codegen.kernels import quant_gemm  # noqa: E402
from kiln.codegen.kernels.quant_gemm import GPTJ, NEOX, GemmConfig, Rope  # noqa: E402
from kiln.ir import AttentionMetadata, ForwardContext, ops, set_forward_context  # noqa: E402
from kiln.ir import quant_ops as Q  # noqa: E402

MAX_POS, NUM_BLOCKS, BLOCK_SIZE = 64, 5, 4


def cos_sin_cache(head_dim: int, device) -> torch.Tensor:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    freqs = torch.arange(MAX_POS, device=device).float()[:, None] * inv_freq
    return torch.cat((freqs.cos(), freqs.sin()), -1)


def reference(x, residual, g, weights, biases, w_scale, position, cs, is_neox, slot, caches, H, HKV, D):
    """The reference op, with the forward context its cache write reads -> (out, summed)."""
    md = AttentionMetadata(torch.tensor([slot], device=x.device), torch.zeros(1, 1, dtype=torch.long), [1], [1],
                           BLOCK_SIZE)
    with set_forward_context(ForwardContext(md, [caches])):
        if residual is None:
            return ops.rms_norm_linear_rope(x, g, 1e-5, weights, biases, w_scale, position, cs, is_neox, 0, H, HKV,
                                            D), None
        return ops.add_rms_norm_linear_rope(x, residual, g, 1e-5, weights, biases, w_scale, position, cs, is_neox, 0,
                                            H, HKV, D)


def emulated(x, residual, g, w, w_scale, bias, position, cs, style, H, D, cast, at_end=False):
    """What the kernel computes, in float64 but rounded where it rounds (`cast`: to x's dtype as
    this run's backend casts): the sum and the normalized row, the product, then the rotation.
    at_end (`quant_gemm.NORM_AT_END`): the row times g unrounded, the product scaled by rstd."""
    dtype = x.dtype
    s = x.double() if residual is None else cast(x.float() + residual.float(), dtype).double()
    rstd = torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-5)
    weight = w.double() if w_scale is None else Q.dequantize_weight(w, w_scale).double()
    if at_end:
        out = torch.nn.functional.linear(g.double() * s, weight) * rstd
    else:
        row = cast(g.float() * cast((s * rstd).float(), dtype).float(), dtype).double()
        out = torch.nn.functional.linear(row, weight)
    out = out + (bias.double() if bias is not None else 0)
    y = cast(out.float(), dtype).double()[0]
    cos, sin = (cast(t.float(), dtype).double() for t in cs[position[0]].chunk(2))
    for head in range((y.numel() - H * D) // (2 * D) + H):  # q and k heads
        cols = head * D + (torch.arange(D // 2) if style == NEOX else 2 * torch.arange(D // 2))
        x1, x2 = y[cols].clone(), y[cols + (D // 2 if style == NEOX else 1)].clone()
        y[cols] = cast((x1 * cos - x2 * sin).float(), dtype).double()
        y[cols + (D // 2 if style == NEOX else 1)] = cast((x2 * cos + x1 * sin).float(), dtype).double()
    return y[None]


# (H, HKV, D, weights, residual, bias, a block_n that leaves several programs per head)
CASES = [(4, 2, 16, "float", True, False, 4), (2, 1, 32, "float", False, True, 8), (4, 2, 16, "int8", True, True, 4),
         (4, 1, 16, "fp8", False, False, 8)]


@pytest.mark.parametrize("at_end", [True, False])
@pytest.mark.parametrize("style", [NEOX, GPTJ])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H, HKV, D, weights, has_residual, has_bias, block_n", CASES)
def test_rope_gemv_is_the_norm_linear_then_rotary_and_cache_write(H, HKV, D, weights, has_residual, has_bias, block_n,
                                                                   dtype, style, at_end, device, poisoned, close, cast,
                                                                   monkeypatch):
    """float32: against the reference op (output, sum and caches). bfloat16: against the kernel's
    arithmetic in float64 rounded where it rounds (the reference op rounds after every torch op,
    the interpreter truncates its casts: they part by more than bfloat16's bounds on some seeds);
    the cache's slot then holds exactly the output's k and v columns. Both ways of normalizing the
    row (`quant_gemm.NORM_AT_END`)."""
    monkeypatch.setattr(quant_gemm, "NORM_AT_END", at_end)
    K, N = 64, (H + 2 * HKV) * D
    x = torch.randn(1, K, device=device).to(dtype)
    residual = torch.randn(1, K, device=device).to(dtype) if has_residual else None
    g = (torch.rand(K, device=device) + 0.5).to(dtype)
    w, w_scale = torch.randn(N, K, device=device) * 0.125, None
    if weights == "float":
        w = w.to(dtype)
    else:
        w, w_scale = Q.quantize_weight(w, weights)
    bias = torch.randn(N, device=device).to(dtype) if has_bias else None
    cs = cos_sin_cache(D, device)
    position = torch.randint(0, MAX_POS, (1,), device=device)
    slot = int(torch.randint(0, NUM_BLOCKS * BLOCK_SIZE, ()))
    caches = [torch.randn(NUM_BLOCKS, BLOCK_SIZE, HKV, D, device=device).to(dtype) for _ in range(2)]
    before = [c.clone() for c in caches]
    rope = Rope(style, position, cs, torch.tensor([slot], device=device), *caches, H, HKV, D)
    out, summed = poisoned(quant_gemm.rope_gemv, x, residual, g, 1e-5, w, bias, rope,
                           config=GemmConfig("gemv", 1, block_n, 32, split_k=4), w_scale=w_scale)
    ref_caches = [c.clone() for c in before]
    ref, ref_summed = reference(x, residual, g, [w], [bias] if has_bias else [], w_scale, position, cs,
                                style == NEOX, slot, ref_caches, H, HKV, D)
    if has_residual:
        close(summed, ref_summed)
    else:
        assert summed is None
    others = torch.ones(NUM_BLOCKS * BLOCK_SIZE, dtype=torch.bool)
    others[slot] = False
    for cache, old in zip(caches, before):
        assert torch.equal(cache.flatten(0, 1)[others], old.flatten(0, 1)[others])  # only the slot is written
    if dtype == torch.float32:
        close(out, ref)
        for cache, ref_cache in zip(caches, ref_caches):
            close(cache, ref_cache)
        return
    close(out, emulated(x, residual, g, w, w_scale, bias, position, cs, style, H, D, cast, at_end), dtype=dtype)
    k_cols, v_cols = out[0, H * D:(H + HKV) * D], out[0, (H + HKV) * D:]
    assert torch.equal(caches[0].flatten(0, 1)[slot].flatten(), k_cols)
    assert torch.equal(caches[1].flatten(0, 1)[slot].flatten(), v_cols)


def test_rope_gemv_skips_a_padding_slot_and_fills_an_fp8_cache(device, poisoned, close):
    """A negative slot (a CUDA graph's padding row) writes no cache; an fp8 cache gets k / k_scale
    and v / v_scale, as the reference's write."""
    H, HKV, D, K = 2, 1, 16, 32
    x, g = torch.randn(1, K, device=device), torch.rand(K, device=device) + 0.5
    w = torch.randn((H + 2 * HKV) * D, K, device=device) * 0.25
    cs = cos_sin_cache(D, device)
    position = torch.tensor([5], device=device)
    caches = [torch.zeros(NUM_BLOCKS, BLOCK_SIZE, HKV, D, device=device) for _ in range(2)]
    rope = Rope(NEOX, position, cs, torch.tensor([-1], device=device), *caches, H, HKV, D)
    out, _ = poisoned(quant_gemm.rope_gemv, x, None, g, 1e-5, w, None, rope)
    assert not any(c.any() for c in caches)
    # (the output does not depend on the slot: the reference's, written into throwaway caches at slot 0)
    close(out, reference(x, None, g, [w], [], None, position, cs, True, 0, [c.clone() for c in caches], H, HKV, D)[0])
    fp8 = [torch.zeros(NUM_BLOCKS, BLOCK_SIZE, HKV, D, device=device, dtype=torch.float8_e4m3fn) for _ in range(2)]
    ref_fp8 = [c.clone() for c in fp8]
    slot = 6
    rope = Rope(NEOX, position, cs, torch.tensor([slot], device=device), *fp8, H, HKV, D, k_scale=0.5, v_scale=2.0)
    poisoned(quant_gemm.rope_gemv, x, None, g, 1e-5, w, None, rope)
    md = AttentionMetadata(torch.tensor([slot], device=device), torch.zeros(1, 1, dtype=torch.long), [1], [1],
                           BLOCK_SIZE)
    with set_forward_context(ForwardContext(md, [ref_fp8], kv_scales=[(0.5, 2.0)])):
        ops.rms_norm_linear_rope(x, g, 1e-5, [w], [], None, position, cs, True, 0, H, HKV, D)
    for cache, ref_cache in zip(fp8, ref_fp8):
        assert cache.float().abs().sum() > 0
        torch.testing.assert_close(cache.float(), ref_cache.float(), rtol=0.07, atol=0.02)  # (an e4m3 ulp)


def test_rope_gemv_refuses_what_it_cannot_do(device):
    H, HKV, D, K = 2, 1, 16, 32
    x, g = torch.randn(1, K, device=device), torch.ones(K, device=device)
    w = torch.randn((H + 2 * HKV) * D, K, device=device)
    caches = [torch.zeros(NUM_BLOCKS, BLOCK_SIZE, HKV, D, device=device) for _ in range(2)]
    slot, position = torch.tensor([0], device=device), torch.tensor([0], device=device)
    with pytest.raises(ValueError, match="full rotary only"):  # a partial-rotary table
        quant_gemm.rope_gemv(x, None, g, 1e-5, w, None, Rope(NEOX, position, cos_sin_cache(8, device), slot,
                                                             *caches, H, HKV, D))
    with pytest.raises(ValueError, match="takes one row"):
        quant_gemm.rope_gemv(torch.randn(2, K, device=device), None, g, 1e-5, w, None,
                             Rope(NEOX, position, cos_sin_cache(D, device), slot, *caches, H, HKV, D))
    with pytest.raises(ValueError, match="rows for 2 q and 2 kv heads"):
        quant_gemm.rope_gemv(x, None, g, 1e-5, w, None, Rope(NEOX, position, cos_sin_cache(D, device), slot,
                                                             *caches, H, 2, D))


def test_the_ops_cuda_implementations_take_the_gemv_for_one_row(device, close, cast):
    """triton_ops' rms_norm_linear_rope / add_rms_norm_linear_rope: a one-row step goes to
    rope_gemv (spied), several rows to the norm + linear and the rotary kernel, rotating the
    projection where it is. With 8-bit weights and float32 rows both match the reference op (output,
    sum, caches); bfloat16 float weights take the gemv where set_float_gemv sends one-row linears."""
    H, HKV, D, K = 4, 2, 16, 64
    g = torch.rand(K, device=device) + 0.5
    wq, ws = Q.quantize_weight(torch.randn((H + 2 * HKV) * D, K, device=device) * 0.125, "int8")
    cs = cos_sin_cache(D, device)
    calls, real = [], quant_gemm.rope_gemv

    def spy(*args, **kwargs):
        calls.append(args[0].shape[0])
        return real(*args, **kwargs)

    def both(impl, x, r, positions, md, weights, w_scale, g):
        caches = [tuple(torch.zeros(NUM_BLOCKS, BLOCK_SIZE, HKV, D, device=device).to(x.dtype) for _ in range(2))]
        with set_forward_context(ForwardContext(md, caches)):
            out, summed = impl.add_rms_norm_linear_rope(x, r, g, 1e-5, weights, [], w_scale, positions, cs, True, 0,
                                                        H, HKV, D)
            plain = impl.rms_norm_linear_rope(x, g, 1e-5, weights, [], w_scale, positions, cs, True, 0, H, HKV, D)
        return out, summed, plain, caches[0]

    try:
        quant_gemm.rope_gemv = spy
        for rows in (1, 3):
            x, r = torch.randn(rows, K, device=device), torch.randn(rows, K, device=device)
            positions = torch.randint(0, MAX_POS, (rows,), device=device)
            slots = torch.randperm(NUM_BLOCKS * BLOCK_SIZE, device=device)[:rows]
            md = AttentionMetadata(slots, torch.zeros(rows, 1, dtype=torch.long), [1] * rows, [1] * rows, BLOCK_SIZE)
            got = both(triton_ops, x, r, positions, md, [wq], ws, g)
            want = both(ops, x, r, positions, md, [wq], ws, g)
            for a, b in zip(got[:3], want[:3]):
                close(a, b)
            for a, b in zip(got[3], want[3]):
                close(a, b)
        assert calls == [1, 1]
        # float weights in bfloat16: the gemv once set_float_gemv says so
        triton_ops.set_float_gemv(True)
        bf16 = torch.bfloat16
        w = (torch.randn((H + 2 * HKV) * D, K, device=device) * 0.125).to(bf16)
        x, gb = torch.randn(1, K, device=device).to(bf16), g.to(bf16)
        position, slot = torch.randint(0, MAX_POS, (1,), device=device), torch.tensor([3], device=device)
        md = AttentionMetadata(slot, torch.zeros(1, 1, dtype=torch.long), [1], [1], BLOCK_SIZE)
        caches = [tuple(torch.zeros(NUM_BLOCKS, BLOCK_SIZE, HKV, D, device=device).to(bf16) for _ in range(2))]
        with set_forward_context(ForwardContext(md, caches)):
            out = triton_ops.rms_norm_linear_rope(x, gb, 1e-5, [w[:H * D], w[H * D:]], [], None, position, cs, True, 0,
                                                  H, HKV, D)
        assert calls == [1, 1, 1]
        close(out, emulated(x, None, gb, w, None, None, position, cs, NEOX, H, D, cast), dtype=bf16)
    finally:
        quant_gemm.rope_gemv = real
        triton_ops.set_float_gemv(False)


@pytest.mark.parametrize("kind", ["int8", "bf16"])
def test_the_embedding_ops_gather_their_row_in_the_gemv(kind, device):
    """triton_ops' embedding_rms_norm_linear[_rope]: one token id goes to the gemv with its row
    gathered from the table by the kernel (spied: the table and the index handed on), several to the
    embedding and then the norm + linear; either way the bits of the gathered rows given to
    rms_norm_linear[_rope] (output, caches), and those rows as the second output."""
    H, HKV, D, K, V = 4, 2, 16, 64, 50
    dtype = torch.float32 if kind == "int8" else torch.bfloat16
    table = torch.randn(V, K, device=device).to(dtype)
    g = (torch.rand(K, device=device) + 0.5).to(dtype)
    w = (torch.randn((H + 2 * HKV) * D, K, device=device) * 0.125).to(dtype)
    weights, w_scale = ([w[:H * D], w[H * D:]], None) if kind == "bf16" else ([Q.quantize_weight(w, "int8")[0]],
                                                                              Q.quantize_weight(w, "int8")[1])
    cs = cos_sin_cache(D, device)
    indexed, real = [], quant_gemm._norm_gemv

    def spy(*args, **kwargs):
        if kwargs.get("index") is not None:
            indexed.append((args[1].data_ptr() == table.data_ptr(), kwargs["index"].numel()))
        return real(*args, **kwargs)

    def run(rows, ids, fused):
        positions = torch.randint(0, MAX_POS, (rows,), device=device, generator=torch.Generator(device).manual_seed(1))
        md = AttentionMetadata(torch.arange(rows, device=device) + 2, torch.zeros(rows, 1, dtype=torch.long),
                               [1] * rows, [1] * rows, BLOCK_SIZE)
        caches = [tuple(torch.zeros(NUM_BLOCKS, BLOCK_SIZE, HKV, D, device=device).to(dtype) for _ in range(2))]
        with set_forward_context(ForwardContext(md, caches)):
            if fused:
                out, hidden = triton_ops.embedding_rms_norm_linear_rope(ids, table, g, 1e-5, weights, [], w_scale,
                                                                        positions, cs, True, 0, H, HKV, D)
                plain, plain_hidden = triton_ops.embedding_rms_norm_linear(ids, table, g, 1e-5, weights, [], w_scale)
                assert torch.equal(plain_hidden, hidden)
            else:
                hidden = table[ids]
                out = triton_ops.rms_norm_linear_rope(hidden, g, 1e-5, weights, [], w_scale, positions, cs, True, 0,
                                                      H, HKV, D)
                plain = triton_ops.rms_norm_linear(hidden, g, 1e-5, weights, [], w_scale)
        return out, hidden, plain, *caches[0]

    try:
        quant_gemm._norm_gemv = spy
        triton_ops.set_float_gemv(True)
        for rows in (1, 3):
            ids = torch.randint(0, V, (rows,), device=device)
            got, want = run(rows, ids, True), run(rows, ids, False)
            for a, b in zip(got, want):
                assert torch.equal(a, b)
        assert indexed == [(True, 1), (True, 1)]  # (the one-token steps' rope and plain ops)
    finally:
        quant_gemm._norm_gemv = real
        triton_ops.set_float_gemv(False)


def test_norm_gemv_refuses_a_gather_it_cannot_do(device):
    table, g = torch.randn(10, 32, device=device), torch.rand(32, device=device)
    w = torch.randn(8, 32, device=device)
    ws = torch.ones(8, device=device)
    wq = w.to(torch.int8)
    with pytest.raises(ValueError, match="one int index"):
        quant_gemm.rms_norm_gemv(table, None, g, 1e-5, wq, w_scale=ws, index=torch.tensor([1, 2], device=device))
    with pytest.raises(ValueError, match="one int index"):
        quant_gemm.rms_norm_gemv(table, torch.randn(1, 32, device=device), g, 1e-5, wq, w_scale=ws,
                                 index=torch.tensor([1], device=device))
