"""The one-launch batch-1 MLP (`kernels/fused_mlp.py`) and the gemv that reads its partial sums, against
the reference ops, under Triton's interpreter (or, with TRITON_INTERPRET=0, on a GPU: the only place
where the atomics of programs running at once really race)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot run")

from kiln.codegen import triton_ops  # noqa: E402
from kiln.codegen.kernels import fused_mlp, quant_gemm  # noqa: E402
from kiln.ir import ops  # noqa: E402

from .conftest import kernel_cast  # noqa: E402


def mlp_weights(H, I, dtype, device):
    g = (torch.rand(H, device=device) + 0.5).to(dtype)
    w_gate_up = (torch.randn(2 * I, H, device=device) * H ** -0.5).to(dtype)
    w_down = (torch.randn(H, I, device=device) * I ** -0.5).to(dtype)
    return g, w_gate_up, w_down


def reference_mlp(x, residual, g, w_gate_up, w_down, activation, eps=1e-6):
    """(down's product in float64 of the gated row rounded as the kernel rounds it, x + residual)."""
    dtype = residual.dtype
    s = kernel_cast(x.float() + residual.float(), dtype).float()
    xs = g.float() * s * torch.rsqrt(s.pow(2).mean() + eps)
    gu = kernel_cast(xs.double() @ w_gate_up.double().t(), dtype)
    gate, up = gu.chunk(2, dim=-1)
    act = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[activation]
    h = kernel_cast(kernel_cast(act(gate.float()), dtype).float() * up.float(), dtype)
    return h.double() @ w_down.double().t(), s.to(dtype)


@pytest.mark.parametrize("dtype, kind", [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, "int8"),
                                         (torch.bfloat16, "fp8")])
@pytest.mark.parametrize("H, I, rows, tiles, depth, activation", [
    (64, 64, 8, 2, 1, "silu"),  # the default tiling, whole rows a step
    (32, 96, 4, 3, 2, "gelu_tanh"),  # three row groups a program, two steps ahead
    (4096, 32, 8, 2, 1, "gelu"),  # rows in two steps of 2048
])
def test_mlp_gemv(H, I, rows, tiles, depth, activation, dtype, kind, device, poisoned, close):
    """The partial sums add up to down's product (into rows that already hold values, which they
    must keep), the sum x + residual is the reference's, and the other buffer comes back zero.
    8-bit weights (kind) with per-channel scales, against the product of the dequantized ones."""
    from kiln.ir.quant_ops import quantize_weight

    x, residual = (torch.randn(1, H, device=device).to(dtype) for _ in range(2))
    g, w_gate_up, w_down = mlp_weights(H, I, dtype, device)
    scales = {}
    if kind is not None:
        (w_gate_up, gus), (w_down, ds) = quantize_weight(w_gate_up, kind), quantize_weight(w_down, kind)
        scales = dict(gate_up_scale=gus, down_scale=ds)
    acc = torch.randn(2, H, device=device)
    before = acc.clone()
    zero = torch.full((2, H), float("nan"), device=device)
    summed = poisoned(fused_mlp.mlp_gemv, x, residual, g, 1e-6, w_gate_up, w_down.t().contiguous(), acc, zero,
                      activation, rows=rows, tiles=tiles, depth=depth, num_warps=4, **scales)
    if kind is not None:  # the dequantized weights, in float64
        w_gate_up, w_down = w_gate_up.double() * gus.double()[:, None], w_down.double() * ds.double()[:, None]
    want, s = reference_mlp(x, residual, g, w_gate_up, w_down, activation)
    close((acc - before).sum(0), want.view(-1), dtype=dtype)
    assert torch.equal(summed, s)
    assert torch.equal(zero, torch.zeros_like(zero))


def test_mlp_gemv_checks(device):
    g, w_gate_up, w_down = mlp_weights(32, 40, torch.float32, device)
    x = torch.randn(1, 32, device=device)
    acc, zero = torch.zeros(2, 32, device=device), torch.zeros(2, 32, device=device)
    with pytest.raises(ValueError, match="do not fit the launch"):  # 40 rows: not a multiple of 8 x 2
        fused_mlp.mlp_gemv(x, x, g, 1e-6, w_gate_up, w_down.t().contiguous(), acc, zero)
    g, w_gate_up, w_down = mlp_weights(32, 64, torch.float32, device)
    with pytest.raises(ValueError, match="do not make a gated MLP"):  # down not transposed
        fused_mlp.mlp_gemv(x, x, g, 1e-6, w_gate_up, w_down, acc, zero)
    with pytest.raises(ValueError, match="two buffers"):
        fused_mlp.mlp_gemv(x, x, g, 1e-6, w_gate_up, w_down.t().contiguous(), acc, acc)
    with pytest.raises(TypeError, match="share a float dtype"):
        fused_mlp.mlp_gemv(x, x.bfloat16(), g, 1e-6, w_gate_up, w_down.t().contiguous(), acc, zero)
    with pytest.raises(TypeError, match="8-bit weights"):
        fused_mlp.mlp_gemv(x, x, g, 1e-6, w_gate_up, w_down.t().contiguous(), acc, zero,
                           gate_up_scale=torch.ones(128), down_scale=torch.ones(32))  # float weights with scales
    with pytest.raises(ValueError, match="at least two slots"):
        fused_mlp.Accumulators(1, 32, device)
    assert fused_mlp.takes(2048, 8192) and fused_mlp.takes(4096, 14336) and not fused_mlp.takes(3000, 8192)


@pytest.mark.parametrize("rope, copies", [(False, 1), (False, 2), (True, 2)])
def test_norm_gemv_reads_partial_sums(rope, copies, device, poisoned, close):
    """rms_norm_gemv / rope_gemv given float32 partial rows: the same output and sum as given
    their sum rounded to the model's dtype (the row fused_mlp stands for)."""
    dtype, K, heads, kv_heads, D = torch.bfloat16, 64, 2, 1, 16
    N = (heads + 2 * kv_heads) * D
    partials = torch.randn(copies, K, device=device)
    row = kernel_cast(partials.sum(0, keepdim=True), dtype)
    residual = torch.randn(1, K, device=device).to(dtype)
    g = (torch.rand(K, device=device) + 0.5).to(dtype)
    w = (torch.randn(N, K, device=device) * K ** -0.5).to(dtype)
    cos_sin = torch.randn(64, D, device=device)
    outs = {}
    for name, x, is_partial in (("row", row, False), ("partials", partials, True)):
        if rope:
            caches = [torch.zeros(2, 4, kv_heads, D, device=device, dtype=dtype) for _ in range(2)]
            rope_args = quant_gemm.Rope(quant_gemm.NEOX, torch.tensor([5], device=device), cos_sin,
                                        torch.tensor([3], device=device), *caches, heads, kv_heads, D)
            out, summed = poisoned(quant_gemm.rope_gemv, x, residual, g, 1e-6, w, None, rope_args, partials=is_partial)
            outs[name] = out, summed, caches
        else:
            out, summed = poisoned(quant_gemm.rms_norm_gemv, x, residual, g, 1e-6, w, partials=is_partial)
            outs[name] = out, summed, []
    (out_a, sum_a, caches_a), (out_b, sum_b, caches_b) = outs["row"], outs["partials"]
    assert torch.equal(sum_b, sum_a)
    close(out_b, out_a.float(), dtype=dtype)
    for a, b in zip(caches_a, caches_b):
        close(b, a.float(), dtype=dtype)
    with pytest.raises(ValueError, match="come with a residual"):
        quant_gemm.rms_norm_gemv(partials, None, g, 1e-6, w, partials=True)


@pytest.mark.parametrize("copies, E", [(1, 64), (2, 64), (2, 40)])
def test_add_rms_norm_reads_partial_sums(copies, E, device, poisoned):
    """The norm kernel given float32 partial rows for its one row: the bits it gives for their sum
    rounded to the residual's dtype (a model's final norm after its last fused MLP)."""
    from kiln.codegen import kernels

    dtype = torch.bfloat16
    partials = torch.randn(copies, E, device=device)
    row = kernel_cast(partials.sum(0, keepdim=True), dtype)
    residual = torch.randn(1, E, device=device).to(dtype)
    g = (torch.rand(E, device=device) + 0.5).to(dtype)
    want = kernels.add_rms_norm(row, residual, g, 1e-6)
    unread = torch.full_like(row, float("nan"))  # x itself is not read
    got = poisoned(kernels.add_rms_norm, unread, residual, g, 1e-6, partials)
    for a, b in zip(want, got):
        assert torch.equal(b, a)
    with pytest.raises(ValueError, match="one row"):
        kernels.add_rms_norm(torch.zeros(2, E, device=device, dtype=dtype), residual.expand(2, E), g, 1e-6, partials)


@pytest.mark.parametrize("kind", [None, "int8"])
def test_ops_hand_partials_on_across_layers(kind, device, monkeypatch, close):
    """triton_ops' add_rms_norm_mlp at one row (the one-launch MLP into an Accumulators slot) and the
    add_rms_norm_linear that reads its partial sums (the last layer's: a final add_rms_norm), three
    layers in a row, twice: the reference ops'
    numbers, and each slot zeroed again by the next layer's launch so that a second forward adds
    into zeros. Then more than one row: the ops' unfused path. Float or 8-bit (kind) MLP weights."""
    from kiln.ir.quant_ops import quantize_weight

    monkeypatch.setattr(triton_ops, "_float_gemv", True)
    dtype, H, I, layers = torch.float16, 32, 64, 3  # (float16: three layers of bfloat16 roundings pile up)
    weights = [mlp_weights(H, I, dtype, device) for _ in range(layers)]
    eight_bit = {}
    if kind is not None:
        for i, (g, w_gate_up, w_down) in enumerate(weights):
            (wq_gu, gus), (wq_d, ds) = quantize_weight(w_gate_up, kind), quantize_weight(w_down, kind)
            weights[i] = (g, wq_gu, wq_d)
            eight_bit[i] = (gus, ds, wq_d)
    g_next = [(torch.rand(H, device=device) + 0.5).to(dtype) for _ in range(layers)]
    w_next = [(torch.randn(H, H, device=device) * H ** -0.5).to(dtype) for _ in range(layers)]
    fused_mlp.reset_all()

    def forward(impl, x, residual):
        for i, (g, w_gate_up, w_down) in enumerate(weights):
            down_t = w_down.t().contiguous()
            out, residual, partials = impl.add_rms_norm_mlp(x, residual, g, 1e-6, [w_gate_up], "silu", down_t, i,
                                                           layers, *eight_bit.get(i, ()))
            if i == layers - 1:  # the model's final norm reads the last MLP's
                return impl.add_rms_norm(out, residual, g_next[i], 1e-6, partials)
            x, residual = impl.add_rms_norm_linear(out, residual, g_next[i], 1e-6, [w_next[i]], [], None, partials)

    for rows in (1, 1, 3):
        x, residual = (torch.randn(rows, H, device=device).to(dtype) for _ in range(2))
        want_x, want_r = forward(ops, x, residual)
        got_x, got_r = forward(triton_ops, x, residual)
        close(got_x, want_x.float(), dtype=torch.bfloat16)  # (the tolerances kept for 16-bit floats)
        close(got_r, want_r.float(), dtype=torch.bfloat16)
    sums = fused_mlp.accumulators(layers, H, x.device).sums  # (the ops key it by the tensors' device: cuda:0)
    assert sums[:-1].abs().sum() == 0 and sums[-1].abs().sum() > 0  # the last slot waits for the next forward
