"""Shared set-up for the Triton kernel tests.

The kernels run on the CPU through Triton's interpreter (TRITON_INTERPRET=1, set here before
triton is first imported) unless the caller sets TRITON_INTERPRET=0 on a CUDA machine, where the
same tests run compiled kernels on the GPU. Inputs are fresh random draws each run (the seed is
printed, so a failure can be replayed), and every allocation a launcher makes is poisoned with
NaN, so an output element the kernel does not write fails the comparison. Each test module
skips itself when triton cannot be imported.
"""

from __future__ import annotations

import contextlib
import os
import random

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# dtype -> (relative norm error, elementwise rtol, elementwise atol) against the reference op in the
# same dtype. bfloat16 keeps 8 significant bits: a rounding that flips in an intermediate (the
# reference rounds after each torch op, a kernel once) moves an element by up to 2 ulps, about 1.6%,
# so the elementwise bound is a few ulps while the norm of the error stays under 1e-2. Triton's
# interpreter truncates float32 -> bfloat16 casts where the GPU rounds to nearest: up to a whole ulp
# (0.8%) instead of half of one, which on a few hundred elements put the norm of a gated
# activation's error at 0.86-1.09% of the reference's (300 seeds), so there the norm bound is 1.5e-2.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
TOLERANCES = {torch.float32: (1e-5, 1e-4, 1e-4), torch.bfloat16: (1.5e-2 if _INTERPRETED else 1e-2, 3e-2, 3e-2)}


@pytest.fixture
def device() -> torch.device:
    if os.environ.get("TRITON_INTERPRET") == "0":
        if not torch.cuda.is_available():
            pytest.skip("TRITON_INTERPRET=0 needs a CUDA device")
        return torch.device("cuda")
    return torch.device("cpu")


@pytest.fixture(autouse=True)
def fresh_seed():
    """A new seed every run, printed so pytest shows it with a failure."""
    seed = random.SystemRandom().randrange(2**31)
    print(f"torch seed {seed}")
    torch.manual_seed(seed)
    return seed


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point():
        return t.fill_(float("nan"))
    if t.dtype != torch.bool:
        # int8: -128, which symmetric quantization (±127) never writes
        return t.fill_(max(-(2**30), torch.iinfo(t.dtype).min) if t.dtype != torch.uint8 else 255)
    return t


@contextlib.contextmanager
def _poisoned_allocations():
    """torch.empty / empty_like / Tensor.new_empty return NaN-filled tensors inside the block."""
    empty, empty_like, new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty
    torch.empty = lambda *a, **k: _poison(empty(*a, **k))
    torch.empty_like = lambda *a, **k: _poison(empty_like(*a, **k))
    torch.Tensor.new_empty = lambda self, *a, **k: _poison(new_empty(self, *a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like, torch.Tensor.new_empty = empty, empty_like, new_empty


@pytest.fixture
def poisoned():
    """`poisoned(fn, *args, **kwargs)` runs a launcher with every allocation it makes NaN-filled."""

    def run(fn, *args, **kwargs):
        with _poisoned_allocations():
            return fn(*args, **kwargs)

    return run


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """Same shape, no NaN where the reference has none, ||out - ref|| / ||ref|| and every element
    within the tolerances of `dtype` (default: out's dtype)."""
    norm_tol, rtol, atol = TOLERANCES[dtype or out.dtype]
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert not (out.isnan() & ~ref.isnan()).any(), "output holds NaN: an element was not written"
    out, ref = out.double().cpu(), ref.double().cpu()
    rel = ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    assert rel <= norm_tol, f"relative error {rel:.3g} > {norm_tol:g}"
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)


@pytest.fixture
def close():
    return assert_close


def kernel_cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x's float32 values cast to `dtype` as a kernel's `.to(dtype)` casts them on this run's
    backend: truncated to bfloat16 under the interpreter (see TOLERANCES), rounded to nearest
    otherwise. A reference that rounds an intermediate the way the kernel does keeps a biased
    truncation from piling up against the tolerance."""
    x = x.float()
    if _INTERPRETED and dtype == torch.bfloat16:
        return (x.view(torch.int32) & -65536).view(torch.float32).to(dtype)
    return x.to(dtype)


@pytest.fixture
def cast():
    return kernel_cast
