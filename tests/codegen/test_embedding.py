"""`kernels/embedding.py` against `F.embedding`: the same rows, bit for bit."""

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from kiln.codegen.kernels.embedding import embedding  # noqa: E402


@pytest.mark.parametrize("shape, E, dtype, id_dtype", [((1,), 64, torch.bfloat16, torch.int64),
                                                       ((7,), 1100, torch.float32, torch.int64),
                                                       ((2, 3), 2048, torch.bfloat16, torch.int32),
                                                       ((0,), 64, torch.float16, torch.int64)])
def test_embedding_is_f_embedding(shape, E, dtype, id_dtype, device, poisoned):
    """Ids anywhere in the table (its first and last rows among them), a row width that is not a
    multiple of the kernel's block, a table that is a slice of a wider one."""
    V = 50
    table = torch.randn(V, E + 16, device=device).to(dtype)[:, :E]
    ids = torch.randint(0, V, shape, device=device, dtype=id_dtype)
    if ids.numel() > 1:
        ids.view(-1)[:2] = torch.tensor([0, V - 1])
    out = poisoned(embedding, ids, table)
    assert out.shape == (*shape, E) and out.dtype == dtype
    assert torch.equal(out, F.embedding(ids.long(), table))


def test_embedding_rejects_float_ids(device):
    with pytest.raises(ValueError, match="integer ids"):
        embedding(torch.zeros(3, device=device), torch.zeros(4, 8, device=device))


@pytest.mark.parametrize("on", [True, False])
def test_the_op_takes_the_kernel_with_its_switch(on, device, monkeypatch):
    """`triton_ops.embedding` (kiln::embedding's CUDA implementation) runs the kernel only with
    TRITON_EMBEDDING on, and gives F.embedding's rows either way."""
    from kiln.codegen import triton_ops
    from kiln.codegen.kernels import embedding as kernel

    calls = []
    monkeypatch.setattr(kernel, "TRITON_EMBEDDING", on)
    monkeypatch.setattr(kernel, "embedding", lambda *a: calls.append(1) or embedding(*a))
    table = torch.randn(20, 96, device=device).to(torch.bfloat16)
    ids = torch.randint(0, 20, (5,), device=device)
    assert torch.equal(triton_ops.embedding(ids, table), F.embedding(ids, table))
    assert len(calls) == (1 if on else 0)
