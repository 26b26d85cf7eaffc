"""The persistent chain of a stack of layers' gemvs (`persistent_chain.chain_gemvs`) against the
same chain in float32 rounded where the kernel rounds. Under the interpreter one program streams
every row (programs run in turn there); on a GPU (TRITON_INTERPRET=0) G programs run at once."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot run")

from kiln.codegen.kernels import persistent_chain  # noqa: E402


def weights(L, H, I, NQKV, dtype, device):
    def w(n, k):
        return (torch.randn(L, n, k, device=device) * k ** -0.5).to(dtype)
    return w(NQKV, H), w(H, H), w(2 * I, H), w(H, I)


@pytest.mark.parametrize("flags", [0, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chain_matches_reference(device, dtype, flags):
    # (bfloat16 over one layer: the random chain's row shrinks layer by layer, and the interpreter
    # truncates where the reference rounds, so deeper chains compare noise; float32 checks three)
    L, H, I, NQKV = (3 if dtype == torch.float32 else 1), 64, 256, 96
    programs = 1 if device.type == "cpu" else 4
    x = torch.randn(H, device=device).to(dtype)
    ws = weights(L, H, I, NQKV, dtype, device)
    counter = torch.zeros(persistent_chain.counter_words(flags), dtype=torch.int32, device=device)
    ref = persistent_chain.reference(x, *ws).float()
    for _ in range(2):  # the second launch finds the counter put back to 0
        out = persistent_chain.chain_gemvs(x, *ws, programs=programs, flags=flags, counter=counter).float()
        err = ((out - ref).norm() / ref.norm()).item()
        assert err < (1e-5 if dtype == torch.float32 else 3e-2), err
        assert not counter.any()


def test_layout_errors():
    with pytest.raises(ValueError, match="q/k/v's 96 rows"):
        persistent_chain.check_layout(64, 256, 96, 16, 4)
    with pytest.raises(ValueError, match="not whole rows of 192"):
        persistent_chain.check_layout(64, 192, 96, 1, 4)
    with pytest.raises(ValueError, match="o's 64 rows"):
        persistent_chain.check_layout(64, 256, 256, 16, 4)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter's one-program rule")
def test_interpreter_takes_one_program():
    ws = weights(1, 64, 256, 96, torch.float32, "cpu")
    with pytest.raises(ValueError, match="only one program"):
        persistent_chain.chain_gemvs(torch.randn(64), *ws, programs=2)
