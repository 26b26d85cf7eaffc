"""Programmatic dependent launch (PDL) for kiln's kernels.

On Hopper and later a kernel launched with PDL may be put on the SMs while the kernel before it
in the stream is still running; it must execute `griddepcontrol.wait` before it touches anything
that kernel (or any earlier one) writes. A decode step is a chain of ~160 small kernels, and
without PDL each one starts only after the previous one has drained and flushed: a few
microseconds of idle device per kernel.

The protocol every kiln kernel follows (`wait_for_inputs` at the top of the kernel):

- Before the wait, a kernel reads only what no kernel before it can have written: the gemv loads
  its first weight tile there, so the weight stream starts while the previous kernel ends, and
  only while a CUDA graph is being captured and for a weight the forward does not make (a
  captured forward never writes a parameter; in eager code the kernel before may be the one that
  made it, a load-time quantization or copy; see `quant_gemm._linear`).
- Every kernel waits, before reading any activation, KV cache or batch-layout tensor and before
  any store, even one that reads nothing its predecessor wrote. A kernel's wait covers only its
  direct predecessor; because every kernel waits, each one completes after the one before it, so
  a wait also covers all earlier kernels.
- Right after the wait a kernel lets its successor launch (`griddepcontrol.launch_dependents`),
  so at most one kernel waits behind a running one. (Letting it launch before the wait, so a
  one-wave kernel's successor starts loading its weights earlier, was timed in session 26 on an
  H100: 1.031-1.036 against 1.028-1.030 ms/token, no gain; codegen/NOTES.md.)

Kernels from Inductor or cuBLAS in the same stream are launched without PDL and keep the usual
stream order. PDL needs CUDA on compute capability 9.0 or later and a Triton that exposes it;
Triton's CPU interpreter has no griddepcontrol, so there `PDL` is always False. `set_enabled`
(the engine's `compilation_config={"pdl": ...}`) turns it off for a process.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

_enabled = True


def set_enabled(enabled: bool) -> None:
    """Launch kiln's kernels with PDL where the device supports it (the default) or never."""
    global _enabled
    _enabled = bool(enabled)


@functools.cache
def _supported(device_index: int) -> bool:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    try:
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def use_pdl(device: torch.device) -> bool:
    """Whether a kernel launched on `device` now uses PDL."""
    if not _enabled or device.type != "cuda":
        return False
    return _supported(device.index if device.index is not None else torch.cuda.current_device())


def launch_args(device: torch.device) -> dict:
    """The keyword arguments a launcher passes: the kernel's PDL constexpr and Triton's launch flag."""
    on = use_pdl(device)
    return {"PDL": on, "launch_pdl": on}


@triton.jit
def wait_for_inputs(PDL: tl.constexpr):
    """Wait until the previous kernels' writes are visible, then let the next kernel launch."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
