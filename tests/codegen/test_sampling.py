"""The greedy argmax kernel (codegen/kernels/sampling.py) against torch.argmax."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kiln.codegen.kernels.sampling import _BLOCK, argmax  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [1, 7, _BLOCK, 3 * _BLOCK + 5])
def test_argmax_is_torch_argmax(V, dtype, device, poisoned):
    x = torch.randn(4, V, device=device).to(dtype)
    if V > 2:
        x[1, V // 3] = x[1, V - 1] = x[1].max() + 1  # a tie: the first index wins
        x[2] = float("-inf")  # a row of -inf: index 0
        x[2, V - 1] = float("-inf")
    out = poisoned(argmax, x)
    assert out.dtype == torch.int64
    assert torch.equal(out, torch.argmax(x, -1))


def test_argmax_ties_across_chunks_and_nan(device):
    V = 2 * _BLOCK + 3
    x = torch.zeros(3, V, device=device)
    x[0, [_BLOCK + 1, 5, 2 * _BLOCK]] = 2.0  # the same maximum in three chunks
    x[1, 2 * _BLOCK + 1] = float("nan")  # NaN wins over every number, as in torch
    x[1, 0] = 1e30
    x[2, :] = -1.0
    x[2, V - 1] = 0.0  # the maximum in the last, partial chunk
    assert argmax(x).tolist() == torch.argmax(x, -1).tolist() == [5, 2 * _BLOCK + 1, V - 1]
    assert argmax(x[:, :0].reshape(0, 5)).shape == (0,)
    with pytest.raises(ValueError, match="empty row"):
        argmax(torch.zeros(2, 0, device=device))


def test_argmax_into_the_row_that_a_device_scalar_names(device):
    """With `out_row`, the result goes into out[out_row] of an [R, B] out, the row read when the
    kernel runs (a decode graph's argmax alternates between token buffers this way); the other
    row and the columns past B keep what they held. greedy_tokens' torch form does the same."""
    from kiln.runtime.sampler import greedy_tokens

    x = torch.randn(3, 2 * _BLOCK + 1, device=device)
    want = torch.argmax(x, -1).tolist()
    for fn in (argmax, greedy_tokens):
        out = torch.full((2, 5), -7, dtype=torch.int64, device=device)
        row = torch.tensor([1], device=device)
        fn(x, out[:, :3], row)
        assert out[1, :3].tolist() == want and out[0].tolist() == [-7] * 5 and out[1, 3:].tolist() == [-7] * 2
        row.fill_(0)  # (the same launch, another row: as a replay after the staging changed)
        fn(x.flip(0), out[:, :3], row)
        assert out[0, :3].tolist() == want[::-1] and out[1, :3].tolist() == want
