"""The TMA gemv (`tma_gemv.tma_gemv`) against torch's product, rows and columns past the tiles included."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot run")

from kiln.codegen.kernels import tma_gemv  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,K,programs", [(64, 128, 2), (70, 200, 3), (16, 64, 8)])
def test_tma_gemv(device, dtype, N, K, programs):
    x = torch.randn(K, device=device).to(dtype)
    w = torch.randn(N, K, device=device).to(dtype)
    out = tma_gemv.tma_gemv(x, w, programs, block_n=16, block_k=64, num_stages=3)
    ref = (w.float() @ x.float())
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert ((out.float() - ref).norm() / ref.norm()).item() < tol


def test_box_limit():
    with pytest.raises(ValueError, match="at most 256"):
        tma_gemv.tma_gemv(torch.randn(512), torch.randn(8, 512), 1, block_k=512)
