"""Gated activation kernels (SwiGLU, GeGLU) against the reference ops."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot run")

from kiln.codegen.kernels import gelu_and_mul, silu_and_mul  # noqa: E402
from kiln.ir import ops  # noqa: E402

# sigmoid's exp(-x) overflows to inf for very negative x, on purpose; numpy (the interpreter) warns
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

SHAPES = [(4, 2 * 64), (3, 2 * 70), (2, 3, 2 * 1500)]  # the last spans two column tiles


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_silu_and_mul(shape, dtype, device, poisoned, close):
    x = torch.randn(shape, device=device).mul_(3).to(dtype)
    close(poisoned(silu_and_mul, x), ops.silu_and_mul(x))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_gelu_and_mul(shape, dtype, approximate, device, poisoned, close):
    x = torch.randn(shape, device=device).mul_(3).to(dtype)
    close(poisoned(gelu_and_mul, x, approximate), ops.gelu_and_mul(x, approximate))


def test_silu_and_mul_strided_rows(device, poisoned, close):
    x = torch.randn(6, 200, device=device)[:, :128]
    close(poisoned(silu_and_mul, x), ops.silu_and_mul(x))
