"""Quantization row kernels and quantized GEMMs against the reference ops of `kiln.ir.quant_ops`.

Under Triton's CPU interpreter everything here runs, fp8 included: fp8 loads, stores and dots work
there (its fp8 dot multiplies through float16, exactly), and the two places where it departs from
the GPU are handled in the kernels (the float32 -> fp8 rounding is done on the e4m3 grid first;
bfloat16 dots upcast to float32). What only a GPU shows: the `torch._scaled_mm` path on CUDA (here
it runs torch's CPU implementation, which checks the arguments we pass, not cuBLASLt), the
split-K counters' memory ordering between concurrently running programs (the interpreter runs
programs one after another), and speed. Run this file with TRITON_INTERPRET=0 on a GPU for those.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot run")

from kiln.codegen import triton_ops  # noqa: E402
from kiln.codegen.kernels import quant_gemm  # noqa: E402
from kiln.codegen.kernels import (  # noqa: E402
    GemmConfig, add_rms_norm_quant, quantize, rms_norm_quant, scaled_linear, silu_and_mul_quant, weight_only_linear,
)
from kiln.ir import quant_ops as Q  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

KINDS = ["int8", "fp8"]
QMAX = {"int8": 127.0, "fp8": 448.0}
# (leading shape, width): power of two and not, two leading dims, one row past the 8192-wide tile
ROW_SHAPES = [((4,), 64), ((3,), 100), ((2, 3), 257), ((2,), 9000)]


def bits(q: torch.Tensor) -> torch.Tensor:
    return q.view(torch.uint8)


def assert_same_quantized(q, s, rq, rs):
    """Bit for bit: codes (int8 or fp8 bytes) and float32 scales."""
    assert q.dtype == rq.dtype and q.shape == rq.shape and s.shape == rs.shape, (q.dtype, q.shape, s.shape)
    assert s.dtype == torch.float32
    assert torch.equal(s, rs), f"scales differ: max rel {((s - rs) / rs).abs().max().item():.3g}"
    # fp8 codes 0x00 and 0x80 (+0 and -0) dequantize alike; the compiled kernel may drop the sign
    # of a zero (an H200 wrote +0 for -0.0 and for -2^-10, which rounds to zero)
    same = (bits(q) == bits(rq)) | ((q.dtype == torch.float8_e4m3fn) & (q.float() == 0) & (rq.float() == 0))
    diff = (~same).sum().item()
    assert diff == 0, f"{diff} of {q.numel()} codes differ"


def assert_quantized_close(q, s, rq, rs, kind, dtype, values):
    """A fused kernel against its reference: the values before quantization differ by rounding
    (float32 sums in another order; in bfloat16 a flip of the last bit, which Triton's interpreter
    makes more often, truncating float32 -> bfloat16), so a code may move by one step and the
    scale by a few ulps of the input dtype. Also: the dequantized output is the op's output to
    within the quantization step (`values`: the unquantized reference, float32)."""
    assert q.dtype == rq.dtype and q.shape == rq.shape and s.shape == rs.shape
    assert not s.isnan().any() and not q.float().isnan().any(), "an output was not written"
    if kind == "int8":
        assert (q != -128).all(), "an int8 code was not written"
    rtol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(s, rs, rtol=rtol, atol=0)
    deq, ref = q.double() * s.double(), rq.double() * rs.double()
    step = torch.maximum(s, rs).double()  # per row
    if kind == "int8":
        tol = 1.01 * step + rtol * ref.abs()
    else:  # one e4m3 step: 2^-3 relative for normals, 2^-9 (times the scale) for subnormals
        tol = (0.125 + rtol) * ref.abs() + 1.01 * 2.0**-9 * step
    bad = (deq - ref).abs() > tol
    assert not bad.any(), f"{bad.sum().item()} values off by more than one step"
    if dtype == torch.float32:
        assert (bits(q) != bits(rq)).float().mean().item() <= 0.01, "too many codes moved"
    # the dequantized output is the op's output to within half a step (plus an input-dtype flip)
    v = values.double()
    if kind == "int8":
        tol = 0.51 * s.double() + rtol * v.abs()
    else:
        tol = (2.0**-4 + rtol) * v.abs() + 1.01 * 2.0**-10 * s.double()
    bad = (deq - v).abs() > tol
    assert not bad.any(), f"{bad.sum().item()} dequantized values further than half a step from the op's output"


# ---------------------------------------------------------------- row kernels


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lead, E", ROW_SHAPES)
def test_quantize_is_bit_exact(lead, E, dtype, kind, device, poisoned):
    """amax is exact in any order and the two divisions are correctly rounded (div_rn), so the
    kernel reproduces the reference bit for bit, ties included."""
    x = torch.randn(*lead, E, device=device).mul_(3).to(dtype)
    assert_same_quantized(*poisoned(quantize, x, kind), *Q.quantize(x, kind))


@pytest.mark.parametrize("kind", KINDS)
def test_quantize_ties_round_to_even(kind, device, poisoned):
    """Rows whose scale is exactly 1 (max |x| = qmax), so x / scale = x: every int8 half-way value,
    every midpoint between neighbouring e4m3 values (subnormal ones too), both zeros, and an
    all-zero row (scale 1e-10 / qmax)."""
    if kind == "int8":
        ties = torch.arange(-127, 127, dtype=torch.float32) + 0.5
        row = torch.cat((torch.tensor([127.0, -127.0]), ties))
    else:
        grid = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 .. 448
        mids = (grid[1:] + grid[:-1]) / 2
        row = torch.cat((grid, mids, -grid, -mids, torch.tensor([-0.0])))
    rows = torch.stack((row[torch.randperm(row.numel())], torch.zeros_like(row))).to(device)
    q, s = poisoned(quantize, rows, kind)
    rq, rs = Q.quantize(rows, kind)
    assert s[0].item() == 1.0
    assert_same_quantized(q, s, rq, rs)


def test_quantize_strided_rows(device, poisoned):
    wide = torch.randn(5, 96, device=device, dtype=torch.bfloat16)
    x = wide[:, 16:80]
    assert_same_quantized(*poisoned(quantize, x, "int8"), *Q.quantize(x, "int8"))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead, E", ROW_SHAPES)
def test_rms_norm_quant(lead, E, dtype, kind, device, poisoned):
    x = torch.randn(*lead, E, device=device).mul_(3).to(dtype)
    w = torch.randn(E, device=device).to(dtype)
    q, s = poisoned(rms_norm_quant, x, w, 1e-6, kind)
    rq, rs = Q.rms_norm_quant(x, w, 1e-6, kind)
    assert_quantized_close(q, s, rq, rs, kind, dtype, Q._rms_norm(x, w, 1e-6).float())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead, E", ROW_SHAPES)
def test_add_rms_norm_quant(lead, E, dtype, kind, device, poisoned, close):
    x, r = (torch.randn(*lead, E, device=device).to(dtype) for _ in range(2))
    w = torch.randn(E, device=device).to(dtype)
    q, s, summed = poisoned(add_rms_norm_quant, x, r, w, 1e-5, kind)
    rq, rs, rsummed = Q.add_rms_norm_quant(x, r, w, 1e-5, kind)
    close(summed, rsummed)
    assert_quantized_close(q, s, rq, rs, kind, dtype, Q._rms_norm(rsummed, w, 1e-5).float())


def test_rms_norm_quant_float32_weight(device, poisoned):
    """A float32 weight on bfloat16 activations: the product is float32, as in the reference."""
    x = torch.randn(3, 64, device=device, dtype=torch.bfloat16)
    w = torch.randn(64, device=device)
    q, s = poisoned(rms_norm_quant, x, w, 1e-6, "int8")
    rq, rs = Q.rms_norm_quant(x, w, 1e-6, "int8")
    assert_quantized_close(q, s, rq, rs, "int8", torch.bfloat16, Q._rms_norm(x, w, 1e-6).float())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead, F", [((4,), 64), ((2, 3), 70), ((2,), 9000)])
def test_silu_and_mul_quant(lead, F, dtype, kind, device, poisoned):
    x = torch.randn(*lead, 2 * F, device=device).mul_(3).to(dtype)
    q, s = poisoned(silu_and_mul_quant, x, kind)
    rq, rs = Q.silu_and_mul_quant(x, kind)
    gate, up = x.chunk(2, dim=-1)
    assert_quantized_close(q, s, rq, rs, kind, dtype, (torch.nn.functional.silu(gate) * up).float())


# ---------------------------------------------------------------- GEMMs

# (M, N, K, config): M = 1 on the gemv kernel (default tiling; forced split-K with a ragged last
# split; four whole K steps, the first peeled), small M on the dot kernel (default; forced split-K, K not a multiple of the block), M = 37
# on the default tiling (M <= 64 bucket) and on 32 x 32 tiles with ragged edges in M, N and K.
GEMM_CASES = [
    (1, 37, 100, None),
    (1, 24, 600, GemmConfig("gemv", 1, 8, 64, split_k=4)),
    (1, 40, 512, GemmConfig("gemv", 1, 8, 128)),
    (1, 37, 100, GemmConfig("gemv", 1, 4, 64, tiles=3)),  # several tiles a program: uneven K steps, rows past N
    (1, 40, 512, GemmConfig("gemv", 1, 2, 512, tiles=4, depth=2)),  # whole rows, two steps ahead
    (5, 40, 300, GemmConfig("dot", 16, 16, 32, split_k=3)),
    (37, 50, 70, None),
    (37, 50, 128, GemmConfig("dot", 32, 32, 32, split_k=2)),
]


def truth_weight_only(x, wq, w_scale, bias):
    """float64 F.linear with the exactly dequantized weight."""
    return torch.nn.functional.linear(x.double(), Q.dequantize_weight(wq, w_scale).double(),
                                      None if bias is None else bias.double())


def test_fp8_gemv_by_bits_converts_every_e4m3_value_exactly(device, monkeypatch):
    """quant_gemm.FP8_BY_BITS: the gemv reads e4m3 weights by their bits. Every finite e4m3 value
    (subnormals, both zeros, +-448) times a one-hot row gives the value itself, as the conversion
    through float16 does."""
    from kiln.codegen.kernels import quant_gemm

    codes = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)  # (no NaN)
    wq = codes.view(torch.float8_e4m3fn).reshape(-1, 1).to(device)  # one weight per output row
    x = torch.ones(1, 1, device=device)
    scale = torch.ones(wq.shape[0], device=device)
    outs = []
    for by_bits in (False, True):
        monkeypatch.setattr(quant_gemm, "FP8_BY_BITS", by_bits)
        outs.append(weight_only_linear(x, wq, scale, None, config=GemmConfig("gemv", 1, 8, 16))[0])
    want = wq.float().reshape(-1)
    assert torch.equal(outs[0], want) and torch.equal(outs[1], want)


@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M, N, K, config", GEMM_CASES)
def test_weight_only_linear(M, N, K, config, dtype, kind, has_bias, device, poisoned, close):
    wq, w_scale = Q.quantize_weight(torch.randn(N, K, device=device), kind)
    x = torch.randn(M, K, device=device).to(dtype)
    bias = torch.randn(N, device=device).to(dtype) if has_bias else None
    out = poisoned(weight_only_linear, x, wq, w_scale, bias, config=config)
    assert out.dtype == dtype
    close(out, truth_weight_only(x, wq, w_scale, bias), dtype=dtype)
    # and the reference op itself, which rounds the dequantized weight to x's dtype first: in
    # bfloat16 that moves a small output of a long sum by more than the elementwise bound, so the norm
    ref = Q.weight_only_linear(x, wq, w_scale, bias).double()
    assert ((out.double() - ref).norm() / ref.norm()).item() <= (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M, N, K, config", GEMM_CASES)
def test_float_linear_is_f_linear(M, N, K, config, dtype, device, poisoned, close):
    """Float weights through the same kernels (scale 1), against float64 F.linear."""
    w = torch.randn(N, K, device=device).to(dtype)
    x = torch.randn(M, K, device=device).to(dtype)
    bias = torch.randn(N, device=device).to(dtype)
    out = poisoned(quant_gemm.float_linear, x, w, bias, config=config)
    assert out.dtype == dtype
    truth = torch.nn.functional.linear(x.double(), w.double(), bias.double())
    close(out, truth, dtype=dtype)
    # stored as float32 by the epilogue (the logits), rounded to x's dtype first: the same values
    wide = poisoned(quant_gemm.float_linear, x, w, bias, config=config, out_dtype=torch.float32)
    assert wide.dtype == torch.float32 and torch.equal(wide, out.float())
    close(wide, truth, dtype=dtype)
    with pytest.raises(TypeError, match="share a float dtype"):
        quant_gemm.float_linear(x, w.to(torch.float16))


def test_float_gemv_dispatch(device, close):
    """With set_float_gemv(True) the CUDA implementations of linear, merged_linear and logits send a
    one-row bfloat16 product to the gemv (the weight's rows land in the output: a call that fell
    back to F.linear would pass too, so the gemv's use is checked by spying on it) and leave
    several rows, float32 and a strided weight to F.linear."""
    from kiln.codegen import triton_ops

    calls, statics = [], []
    real = quant_gemm.float_linear

    def spy(*args, **kwargs):
        calls.append(args[1].shape)
        statics.append(kwargs.get("static_weight", True))
        return real(*args, **kwargs)

    w1, w2 = (torch.randn(n, 64, device=device).to(torch.bfloat16) for n in (24, 40))
    merged = torch.cat([w1, w2])
    x = torch.randn(1, 64, device=device).to(torch.bfloat16)
    truth = torch.nn.functional.linear(x.double(), merged.double())
    try:
        quant_gemm.float_linear = spy
        triton_ops.set_float_gemv(True)
        one = triton_ops.merged_linear(x, [merged[:24], merged[24:]], [])
        assert calls == [(64, 64)] and statics == [True]  # a view of the parameters: static
        close(one, truth, dtype=torch.bfloat16)
        # weights not back to back are concatenated by the forward: not static (no early loads)
        close(triton_ops.merged_linear(x, [w1, w2], []), truth, dtype=torch.bfloat16)
        assert statics == [True, False]
        calls.pop()
        close(triton_ops.linear(x, w1), truth[:, :24], dtype=torch.bfloat16)
        head = triton_ops.logits(x, merged)
        assert head.dtype == torch.float32 and len(calls) == 3
        assert torch.equal(head, head.to(torch.bfloat16).float())  # rounded to the model dtype, as the reference
        close(head, truth, dtype=torch.bfloat16)
        calls.clear()
        triton_ops.linear(torch.randn(2, 64, device=device).to(torch.bfloat16), w1)  # two rows
        triton_ops.linear(x.float(), w1.float())  # float32
        triton_ops.linear(x, torch.randn(64, 24, device=device).to(torch.bfloat16).t())  # strided weight
        triton_ops.set_float_gemv(False)
        triton_ops.linear(x, w1)
        assert calls == []
    finally:
        quant_gemm.float_linear = real
        triton_ops.set_float_gemv(False)


NORM_GEMV_CASES = [
    (40, 64, None),
    (33, 96, GemmConfig("gemv", 1, 4, 32)),  # three K steps, rows past N
    (24, 200, GemmConfig("gemv", 1, 8, 64, split_k=2)),  # uneven K, split: each split normalizes the whole row
    (33, 96, GemmConfig("gemv", 1, 4, 32, tiles=3)),  # several tiles a program, three K steps, rows past N
    (40, 200, GemmConfig("gemv", 1, 2, 256, tiles=4, depth=2)),  # whole uneven rows, made once a program
]


def prologue_weight(N, K, dtype, kind, device):
    """(w, w_scale, its float64 value): float weights in dtype, or 8-bit ones (weight-only)."""
    w = torch.randn(N, K, device=device) * K ** -0.5
    if kind is None:
        return w.to(dtype), None, w.to(dtype).double()
    wq, w_scale = Q.quantize_weight(w, kind)
    return wq, w_scale, Q.dequantize_weight(wq, w_scale).double()


@pytest.mark.parametrize("at_end", [True, False])
@pytest.mark.parametrize("kind", [None, "int8", "fp8"])
@pytest.mark.parametrize("has_residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N, K, config", NORM_GEMV_CASES)
def test_rms_norm_gemv(N, K, config, dtype, has_residual, kind, at_end, device, poisoned, close, monkeypatch):
    """The gemv that normalizes its row first, with float or 8-bit weights: the sum as the
    reference's, the output against float64 F.linear of the reference op's normalized row
    (rounded as rms_norm rounds it). Both ways of normalizing (`quant_gemm.NORM_AT_END`: the
    statistics in the product's loop, or a pass of their own first; a split K takes the second)."""
    from kiln.ir import ops

    monkeypatch.setattr(quant_gemm, "NORM_AT_END", at_end)

    x = torch.randn(1, K, device=device).to(dtype)
    residual = torch.randn(1, K, device=device).to(dtype) if has_residual else None
    g = (torch.rand(K, device=device) + 0.5).to(dtype)
    w, w_scale, w64 = prologue_weight(N, K, dtype, kind, device)
    bias = torch.randn(N, device=device).to(dtype)
    out, summed = poisoned(quant_gemm.rms_norm_gemv, x, residual, g, 1e-6, w, bias, config=config, w_scale=w_scale)
    s = x + residual if has_residual else x
    if has_residual:
        close(summed, s)
    else:
        assert summed is None
    truth = torch.nn.functional.linear(ops.rms_norm(s, g, 1e-6).double(), w64, bias.double())
    assert out.dtype == dtype
    close(out, truth, dtype=dtype)


@pytest.mark.parametrize("kind", [None, "int8", "fp8"])
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N, K, config", NORM_GEMV_CASES)
def test_act_and_mul_gemv(N, K, config, dtype, activation, kind, device, poisoned, close):
    """The gemv that gates its row first (x holds (gate, up)), with float or 8-bit weights:
    against float64 F.linear of the reference gated activation (rounded as its op rounds it)."""
    from kiln.ir import ops

    x = torch.randn(1, 2 * K, device=device).to(dtype)
    w, w_scale, w64 = prologue_weight(N, K, dtype, kind, device)
    bias = torch.randn(N, device=device).to(dtype)
    out = poisoned(quant_gemm.act_and_mul_gemv, x, activation, w, bias, config=config, w_scale=w_scale)
    gated = ops.silu_and_mul(x) if activation == "silu" else ops.gelu_and_mul(x, "tanh" if activation == "gelu_tanh" else "none")
    assert out.dtype == dtype
    close(out, torch.nn.functional.linear(gated.double(), w64, bias.double()), dtype=dtype)
    with pytest.raises(ValueError, match="input of shape"):
        quant_gemm.act_and_mul_gemv(x[:, :K], activation, w, w_scale=w_scale)
    with pytest.raises(ValueError, match="activation must be"):
        quant_gemm.act_and_mul_gemv(x, "relu", w, w_scale=w_scale)


def test_rms_norm_gemv_checks(device):
    w, g = torch.randn(8, 32, device=device), torch.ones(32, device=device)
    with pytest.raises(ValueError, match="one row"):
        quant_gemm.rms_norm_gemv(torch.randn(2, 32, device=device), None, g, 1e-6, w)
    with pytest.raises(TypeError, match="share a float dtype"):
        quant_gemm.rms_norm_gemv(torch.randn(1, 32, device=device), None, g.to(torch.bfloat16), 1e-6, w)
    with pytest.raises(TypeError, match="int8 or float8_e4m3fn"):
        quant_gemm.rms_norm_gemv(torch.randn(1, 32, device=device), None, g, 1e-6, w, w_scale=torch.ones(8))
    with pytest.raises(TypeError, match="must have x's dtype"):
        quant_gemm.act_and_mul_gemv(torch.randn(1, 64, device=device), "silu", w.to(torch.bfloat16))


def kernel_norm_row(x, residual, g, eps, cast):
    """rms_norm(x [+ residual]) rounded where the kernels round it: the sum, the normalized row, the
    scaled row (the reference op rounds after each torch op, the interpreter truncates its casts:
    against it a one-row bfloat16 product's error reached 1.2-1.4e-2 of 1.5e-2 over 120 seeds)."""
    s = x.float() if residual is None else cast(x.float() + residual.float(), x.dtype).float()
    y = cast(s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps), x.dtype).float()
    return cast(g.float() * y, x.dtype)


def kernel_gated_row(gate_up, cast):
    """silu(gate) * up rounded where the kernels round it (see kernel_norm_row)."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    return cast(cast(torch.nn.functional.silu(gate), gate_up.dtype).float() * up, gate_up.dtype)


def test_norm_linear_dispatch(device, close, cast):
    """With set_float_gemv(True) the CUDA implementations of rms_norm_linear / add_rms_norm_linear /
    act_and_mul_linear send a one-row bfloat16 step to the normalizing (gating) gemv and several
    rows to the norm (activation) kernel and the linear; both match the reference ops."""
    from kiln.ir import ops

    calls = []
    real, real_act = quant_gemm.rms_norm_gemv, quant_gemm.act_and_mul_gemv

    def spy(*args, **kwargs):
        calls.append(args[0].shape[0])
        return real(*args, **kwargs)

    def spy_act(*args, **kwargs):
        calls.append(("act", args[0].shape[0]))
        return real_act(*args, **kwargs)

    bf16 = torch.bfloat16
    g = (torch.rand(64, device=device) + 0.5).to(bf16)
    weights = [(torch.randn(n, 64, device=device) * 0.125).to(bf16) for n in (24, 40)]
    try:
        quant_gemm.rms_norm_gemv, quant_gemm.act_and_mul_gemv = spy, spy_act
        triton_ops.set_float_gemv(True)
        w64 = torch.cat(weights).double()
        for rows in (1, 3):
            x, r = (torch.randn(rows, 64, device=device).to(bf16) for _ in range(2))
            close(triton_ops.rms_norm_linear(x, g, 1e-5, weights, []),
                  torch.nn.functional.linear(kernel_norm_row(x, None, g, 1e-5, cast).double(), w64), dtype=bf16)
            out, summed = triton_ops.add_rms_norm_linear(x, r, g, 1e-5, weights, [])
            close(out, torch.nn.functional.linear(kernel_norm_row(x, r, g, 1e-5, cast).double(), w64), dtype=bf16)
            close(summed, ops.add_rms_norm_linear(x, r, g, 1e-5, weights, [])[1])
            gate_up = torch.randn(rows, 128, device=device).to(bf16)
            close(triton_ops.act_and_mul_linear(gate_up, "silu", weights, []),
                  torch.nn.functional.linear(kernel_gated_row(gate_up, cast).double(), w64), dtype=bf16)
        assert calls == [1, 1, ("act", 1)]
        # 8-bit weights (weight-only) go to the gemv at one row whatever set_float_gemv says, as
        # weight_only_linear does; against float64 with the exactly dequantized weight (the
        # reference op rounds it to bf16 first)
        triton_ops.set_float_gemv(False)
        wq, ws = Q.quantize_weight(torch.randn(24, 64, device=device) * 0.125, "int8")
        w64 = Q.dequantize_weight(wq, ws).double()
        calls.clear()
        for rows in (1, 3):
            x, r = (torch.randn(rows, 64, device=device).to(bf16) for _ in range(2))
            out, summed = triton_ops.add_rms_norm_linear(x, r, g, 1e-5, [wq], [], ws)
            close(out, torch.nn.functional.linear(kernel_norm_row(x, r, g, 1e-5, cast).double(), w64), dtype=bf16)
            close(summed, x + r)
            gate_up = torch.randn(rows, 128, device=device).to(bf16)
            close(triton_ops.act_and_mul_linear(gate_up, "silu", [wq], [], ws),
                  torch.nn.functional.linear(kernel_gated_row(gate_up, cast).double(), w64), dtype=bf16)
        assert calls == [1, ("act", 1)]
    finally:
        quant_gemm.rms_norm_gemv, quant_gemm.act_and_mul_gemv = real, real_act
        triton_ops.set_float_gemv(False)


def test_weight_only_linear_leading_dims_and_float16(device, poisoned, close):
    """[..., K] in, [..., N] out; float16 activations take the int8 -> float16 exponent trick."""
    wq, w_scale = Q.quantize_weight(torch.randn(24, 80, device=device), "int8")
    x = torch.randn(2, 3, 80, device=device, dtype=torch.float16)
    out = poisoned(weight_only_linear, x, wq, w_scale, None)
    assert out.shape == (2, 3, 24)
    close(out, truth_weight_only(x, wq, w_scale, None), dtype=torch.bfloat16)


def truth_scaled(xq, x_scale, wq, w_scale, bias):
    out = (xq.double() @ wq.double().t()) * x_scale.double() * w_scale.double()
    return out if bias is None else out + bias.double()


@pytest.mark.parametrize("bias_dtype", [None, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("M, N, K, config", GEMM_CASES)
def test_scaled_linear_triton(M, N, K, config, kind, out_dtype, bias_dtype, device, poisoned, close):
    xq, x_scale = Q.quantize(torch.randn(M, K, device=device), kind)
    wq, w_scale = Q.quantize_weight(torch.randn(N, K, device=device), kind)
    bias = torch.randn(N, device=device).to(bias_dtype) if bias_dtype else None
    out = poisoned(scaled_linear, xq, x_scale, wq, w_scale, bias, out_dtype, config=config, backend="triton")
    assert out.dtype == out_dtype
    if kind == "fp8" and device.type == "cuda" and out_dtype == torch.float32:
        # Hopper's fp8 tensor cores accumulate with fewer than float32's bits (the known fp8
        # "fast accumulation"): measured 8e-5 relative on an H200, against 1e-5 for float32 math.
        # The error scales with the partial sums, not with each output: elementwise 1e-3 failed
        # now and then on an H100 (M=37, K=70), so the bound is relative to the largest output.
        truth = truth_scaled(xq, x_scale, wq, w_scale, bias)
        assert ((out.double() - truth).norm() / truth.norm()).item() <= 1e-3
        torch.testing.assert_close(out.double(), truth, rtol=1e-2, atol=2e-3 * truth.abs().max().item())
        return
    close(out, truth_scaled(xq, x_scale, wq, w_scale, bias), dtype=out_dtype)
    close(out, Q.scaled_linear(xq, x_scale, wq, w_scale, bias, out_dtype), dtype=out_dtype)


@pytest.mark.parametrize("M, N, K, config", GEMM_CASES)
def test_scaled_linear_int8_accumulates_exactly(M, N, K, config, device, poisoned):
    """int8 x int8 accumulates in int32: with unit scales, a float32 output and |sum| < 2^24 the
    result is the integer product exactly, split-K included (its partials are int32 too)."""
    xq = torch.randint(-127, 128, (M, K), dtype=torch.int8, device=device)
    wq = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=device)
    ones_m, ones_n = torch.ones(M, 1, device=device), torch.ones(N, device=device)
    out = poisoned(scaled_linear, xq, ones_m, wq, ones_n, None, torch.float32, config=config, backend="triton")
    assert torch.equal(out, (xq.double() @ wq.double().t()).float())  # exact: |sums| < 2^53


def test_scaled_linear_leading_dims(device, poisoned, close):
    xq, x_scale = Q.quantize(torch.randn(2, 3, 64, device=device), "fp8")
    wq, w_scale = Q.quantize_weight(torch.randn(32, 64, device=device), "fp8")
    out = poisoned(scaled_linear, xq, x_scale, wq, w_scale, None, torch.bfloat16, backend="triton")
    assert out.shape == (2, 3, 32)
    close(out, truth_scaled(xq, x_scale, wq, w_scale, None), dtype=torch.bfloat16)


def test_scaled_linear_backend_choice(device):
    """torch._scaled_mm where it takes the call (fp8, sm89+, K and N multiples of 16, bf16 out, no
    bias or a bf16 one) with more than 16 rows, the Triton kernel otherwise; int8 always goes to Triton."""
    def pick(K=64, N=32, kind="fp8", out=torch.bfloat16, bias=None, cap=(9, 0), M=64):
        dt = Q.QUANT_DTYPES[kind]
        xq = torch.zeros(M, K, device=device).to(dt)
        wq = torch.zeros(N, K, device=device).to(dt)
        return quant_gemm.scaled_linear_backend(xq, wq, bias, out, capability=cap)

    assert pick() == "scaled_mm"
    assert pick(bias=torch.zeros(32, dtype=torch.bfloat16)) == "scaled_mm"
    assert pick(cap=(8, 9)) == "scaled_mm"
    assert pick(bias=torch.zeros(32)) == "triton"  # float32 bias: refused by _scaled_mm
    assert pick(K=100) == "triton"
    assert pick(N=40) == "triton"
    assert pick(out=torch.float16) == "triton"
    assert pick(out=torch.float32) == "triton"
    assert pick(kind="int8") == "triton"
    assert pick(cap=(8, 0)) == "triton"
    assert pick(M=1) == "triton" and pick(M=16) == "triton" and pick(M=17) == "scaled_mm"  # decode: Triton
    xq = torch.zeros(3, 64, device=device).to(torch.float8_e4m3fn)
    expect = "triton" if xq.device.type == "cpu" else None  # a CPU tensor: no CUDA capability
    if expect:
        assert quant_gemm.scaled_linear_backend(xq, xq[:32], None, torch.bfloat16) == expect


@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("M", [1, 37])
def test_scaled_linear_scaled_mm(M, has_bias, device, close):
    """The _scaled_mm branch: the operands, the row-wise scales ([M, 1] and [1, N]) and the bias as
    we hand them over. On CPU this is torch's own CPU implementation of _scaled_mm."""
    xq, x_scale = Q.quantize(torch.randn(M, 64, device=device), "fp8")
    wq, w_scale = Q.quantize_weight(torch.randn(48, 64, device=device), "fp8")
    bias = torch.randn(48, device=device).to(torch.bfloat16) if has_bias else None
    try:
        out = scaled_linear(xq, x_scale, wq, w_scale, bias, torch.bfloat16, backend="scaled_mm")
    except (RuntimeError, NotImplementedError) as e:  # a torch build without _scaled_mm on this device
        pytest.skip(f"torch._scaled_mm unavailable here: {e}")
    close(out, truth_scaled(xq, x_scale, wq, w_scale, bias), dtype=torch.bfloat16)


def test_a_config_of_several_tiles_takes_the_tiles_kernel(device, monkeypatch, close):
    """tiles > 1 launches `_gemv_tiles_kernel` over cdiv(N, rows x tiles) programs (the plain gemv
    would give the same numbers, so the launch is what is checked); the rotary gemv and 8-bit
    activations (W8A8) take the plain gemv whatever the config."""
    grids = []

    class Spy:
        def __getitem__(self, grid):
            grids.append(grid)
            return real[grid]

    real = quant_gemm._gemv_tiles_kernel
    monkeypatch.setattr(quant_gemm, "_gemv_tiles_kernel", Spy())
    config = GemmConfig("gemv", 1, 4, 64, tiles=3)
    w = torch.randn(37, 100, device=device)
    x = torch.randn(1, 100, device=device)
    close(quant_gemm.float_linear(x, w, config=config), torch.nn.functional.linear(x.double(), w.double()))
    assert grids == [(4,)]
    xq, x_scale = Q.quantize(x, "int8")
    wq, w_scale = Q.quantize_weight(w, "int8")
    scaled_linear(xq, x_scale, wq, w_scale, None, torch.float32, config=config, backend="triton")
    assert grids == [(4,)]
    deep = GemmConfig("gemv", 1, 4, 64, tiles=3, depth=2)
    rope_config = quant_gemm._rope_config(deep, SimpleNamespace(head_dim=64), None)  # (all it reads)
    assert (rope_config.tiles, rope_config.depth) == (1, 1)


def test_gemm_config_checks():
    with pytest.raises(ValueError, match="tiles must be"):
        GemmConfig("gemv", 1, 4, 64, tiles=0)
    with pytest.raises(ValueError, match="depth 1 or 2"):
        GemmConfig("gemv", 1, 4, 64, tiles=2, depth=3)
    with pytest.raises(ValueError, match="without split K"):
        GemmConfig("gemv", 1, 4, 64, split_k=2, tiles=2)
    with pytest.raises(ValueError, match="without split K"):
        GemmConfig("dot", 16, 16, 32, tiles=2)
    with pytest.raises(ValueError, match="gemv"):
        weight_only_linear(torch.randn(2, 32), torch.zeros(16, 32, dtype=torch.int8), torch.ones(16), None,
                           config=GemmConfig("gemv", 1, 8, 32))
    with pytest.raises(ValueError, match="power of two"):
        GemmConfig("dot", 16, 48, 32)
    with pytest.raises(ValueError, match="at least 16"):
        GemmConfig("dot", 16, 8, 32)


def test_pick_config_buckets():
    """The M buckets: gemv at M = 1 (split K only when N is small, while split-K is on by
    default), 16-row dot tiles up to 16, compute-bound tiles beyond; every config is valid."""
    sms = 132
    big = quant_gemm.pick_config(1, 16384, 2048, torch.bfloat16, sms)
    assert big.kernel == "gemv" and big.split_k == 1 and (big.block_n, big.tiles) == (2, 4)
    # 8-bit activations (W8A8) take the plain gemv, on the plain tile the role had
    for a in (torch.int8, torch.float8_e4m3fn):
        w8a8 = quant_gemm.pick_config(1, 16384, 2048, a, sms, a)
        assert (w8a8.block_n, w8a8.block_k, w8a8.num_warps, w8a8.tiles) == (16, 512, 8, 1)
    float_down = quant_gemm.pick_config(1, 2048, 8192, torch.bfloat16, sms, torch.bfloat16)
    assert (float_down.block_n, float_down.block_k, float_down.num_warps) == (8, 2048, 8)
    assert quant_gemm.pick_config(1, 2048, 8192, torch.bfloat16, sms, torch.int8).block_n == 4
    # Llama-3.1-8B's 16-bit matrices, whole and halved by TP=2, take the "deep" tiles; its 8-bit ones keep theirs
    for n, k in ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (3072, 4096), (4096, 7168)):
        deep = quant_gemm.pick_config(1, n, k, torch.bfloat16, sms, torch.bfloat16)
        assert (deep.block_n, deep.block_k, deep.num_warps) == (4, 2048, 8), (n, k)
    assert quant_gemm.pick_config(1, 4096, 14336, torch.bfloat16, sms, torch.int8).block_n == 4
    assert quant_gemm.pick_config(1, 6144, 4096, torch.bfloat16, sms, torch.int8).block_k == 1024
    small_n = quant_gemm.pick_config(1, 512, 4096, torch.bfloat16, sms)
    assert small_n.kernel == "gemv" and (small_n.split_k > 1) == quant_gemm.SPLIT_K_BY_DEFAULT
    assert quant_gemm.pick_config(8, 2048, 2048, torch.bfloat16, sms).block_m == 16
    prefill = quant_gemm.pick_config(4096, 2048, 2048, torch.int8, sms)
    assert prefill.kernel == "dot" and prefill.block_m == 128 and prefill.block_k == 128


def test_parse_gemv_tiles_reads_roles_and_refuses_unknown_ones():
    """KILN_GEMV_TILES / --compare-gemv-tiles: ROLE=ROWSxKxWARPS, 8-bit roles and the rotary gemv's."""
    assert quant_gemm.parse_gemv_tiles(" small=8x1024x8, 8bit.long=4x2048x8,deep+rope=4x2048x8") == {
        (2, "small"): (8, 1024, 8), (1, "long"): (4, 2048, 8), (2, "deep+rope"): (4, 2048, 8)}
    assert quant_gemm.parse_gemv_tiles("wide=4x2048x8x4,long=2x8192x8x2x2") == {
        (2, "wide"): (4, 2048, 8, 4, 1), (2, "long"): (2, 8192, 8, 2, 2)}
    assert quant_gemm.parse_gemv_tiles("") == {}
    with pytest.raises(ValueError, match="unknown role 'huge'"):
        quant_gemm.parse_gemv_tiles("huge=4x1024x4")
    with pytest.raises(ValueError, match="ROWSxKxWARPS"):
        quant_gemm.parse_gemv_tiles("small=4x1024")
    with pytest.raises(ValueError, match="ROWSxKxWARPS"):
        quant_gemm.parse_gemv_tiles("small=4x1024x4x2x1x1")
    with pytest.raises(ValueError, match="one tile a program"):
        quant_gemm.parse_gemv_tiles("8bit.narrow+rope=2x2048x8x2")


def test_a_tile_entry_may_name_tiles_a_program(monkeypatch):
    """A 5-value `_GEMV_TILES` entry gives the config its tiles and depth; without them, one tile."""
    monkeypatch.setitem(quant_gemm._GEMV_TILES, (2, "long"), (2, 8192, 8, 2, 2))
    cfg = quant_gemm.pick_config(1, 2048, 8192, torch.bfloat16, 132, torch.bfloat16)
    assert (cfg.block_n, cfg.block_k, cfg.num_warps, cfg.tiles, cfg.depth, cfg.split_k) == (2, 8192, 8, 2, 2, 1)
    monkeypatch.setitem(quant_gemm._GEMV_TILES, (2, "long"), (8, 2048, 8))
    assert quant_gemm.pick_config(1, 2048, 8192, torch.bfloat16, 132, torch.bfloat16).tiles == 1


def test_the_rotary_gemv_takes_its_roles_rope_tile_where_there_is_one(monkeypatch):
    """A "ROLE+rope" entry of _GEMV_TILES is the q/k/v gemv's with the rotary epilogue alone; without
    one it takes its role's."""
    deep = (4, 2048, 8)
    for rope in (False, True):
        cfg = quant_gemm.pick_config(1, 3072, 4096, torch.bfloat16, 132, torch.bfloat16, rope=rope)
        assert (cfg.block_n, cfg.block_k, cfg.num_warps) == deep
    monkeypatch.setitem(quant_gemm._GEMV_TILES, (2, "deep+rope"), (8, 1024, 8))
    with_rope = quant_gemm.pick_config(1, 3072, 4096, torch.bfloat16, 132, torch.bfloat16, rope=True)
    assert (with_rope.block_n, with_rope.block_k, with_rope.num_warps) == (8, 1024, 8)
    bare = quant_gemm.pick_config(1, 3072, 4096, torch.bfloat16, 132, torch.bfloat16)
    assert (bare.block_n, bare.block_k, bare.num_warps) == deep


def test_register_cuda_kernels_includes_quant_ops():
    assert triton_ops.register_cuda_kernels() is True
    for name in ("quantize", "rms_norm_quant", "add_rms_norm_quant", "silu_and_mul_quant", "scaled_linear",
                 "weight_only_linear"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"kiln::{name}", "CUDA"), name


# ---------------------------------------------------------------- GPU only

def _need_gpu(device):
    if device.type != "cuda":
        pytest.skip("GPU only: the interpreter runs programs one after another, and has no cuBLASLt")


@pytest.mark.parametrize("config", [GemmConfig("gemv", 1, 4, 256, split_k=8),
                                    GemmConfig("dot", 16, 32, 256, split_k=8)])
def test_split_k_concurrent_programs(config, device):
    """Thousands of programs storing split-K partials at once, launch after launch: the sums (a
    second launch, in stream order) must be exact. (The single-launch reduction failed this.)"""
    _need_gpu(device)
    M = 1 if config.kernel == "gemv" else 16
    xq = torch.randint(-127, 128, (M, 8192), dtype=torch.int8, device=device)
    wq = torch.randint(-127, 128, (4096, 8192), dtype=torch.int8, device=device)
    ones_m, ones_n = torch.ones(M, 1, device=device), torch.ones(4096, device=device)
    exact = (xq.double() @ wq.double().t()).float()  # exact, then rounded once, as the int32 sum is
    for _ in range(20):
        out = scaled_linear(xq, ones_m, wq, ones_n, None, torch.float32, config=config, backend="triton")
        assert torch.equal(out, exact)


def test_cuda_ops_dispatch_to_kernels(device, close):
    """Through the dispatcher (as a compiled graph calls them): scaled_linear picks _scaled_mm on an
    sm89+ card, and the results match the references."""
    _need_gpu(device)
    assert triton_ops.register_cuda_kernels()
    x = torch.randn(32, 256, device=device, dtype=torch.bfloat16)
    wq, w_scale = Q.quantize_weight(torch.randn(128, 256, device=device), "fp8")
    xq, x_scale = torch.ops.kiln.quantize(x, "fp8")
    assert_same_quantized(xq, x_scale, *Q.quantize(x, "fp8"))
    if torch.cuda.get_device_capability(device) >= (8, 9):
        assert quant_gemm.scaled_linear_backend(xq, wq, None, torch.bfloat16) == "scaled_mm"
    out = torch.ops.kiln.scaled_linear(xq, x_scale, wq, w_scale, None, torch.bfloat16)
    close(out, truth_scaled(xq, x_scale, wq, w_scale, None), dtype=torch.bfloat16)
    out = torch.ops.kiln.weight_only_linear(x, wq, w_scale, None)
    close(out, truth_weight_only(x, wq, w_scale, None), dtype=torch.bfloat16)
