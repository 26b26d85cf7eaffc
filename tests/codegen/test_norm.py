"""RMSNorm and residual-add + RMSNorm kernels against the reference ops."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot run")

from kiln.codegen.kernels import add_rms_norm, rms_norm  # noqa: E402
from kiln.ir import ops  # noqa: E402

# (leading shape, hidden): power-of-two and not, one row longer than a single 8192-wide tile
SHAPES = [((4,), 64), ((3,), 100), ((2, 3), 257), ((2,), 9000)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead, E", SHAPES)
def test_rms_norm(lead, E, dtype, device, poisoned, close):
    x = torch.randn(*lead, E, device=device).mul_(3).to(dtype)
    w = torch.randn(E, device=device).to(dtype)
    close(poisoned(rms_norm, x, w, 1e-6), ops.rms_norm(x, w, 1e-6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead, E", SHAPES)
def test_add_rms_norm(lead, E, dtype, device, poisoned, close):
    x, r = (torch.randn(*lead, E, device=device).to(dtype) for _ in range(2))
    w = torch.randn(E, device=device).to(dtype)
    out, summed = poisoned(add_rms_norm, x, r, w, 1e-5)
    ref_out, ref_summed = ops.add_rms_norm(x, r, w, 1e-5)
    close(summed, ref_summed)
    close(out, ref_out)


def test_rms_norm_strided_rows_and_float32_weight(device, poisoned, close):
    """A view with a row stride (a slice of a wider tensor) and a float32 weight on bfloat16
    activations, whose product promotes to float32 as in the reference."""
    wide = torch.randn(5, 96, device=device, dtype=torch.bfloat16)
    x, w = wide[:, 16:80], torch.randn(64, device=device)
    out = poisoned(rms_norm, x, w, 1e-6)
    assert out.dtype == torch.float32
    close(out, ops.rms_norm(x, w, 1e-6), dtype=torch.bfloat16)
