"""A batch-1 gemv whose weight stream goes through TMA (an experiment, session 31).

kiln's gemvs load weights with `tl.load` into registers: what a program has in flight is what its
registers hold, so a launch keeps enough bytes in flight only with many programs an SM, and each
launch ramps up and drains (codegen/NOTES.md: gate/up streams at 93% of the copy bandwidth in 3.9
waves, lm_head at 106% in 30). Here the weights come through a tensor descriptor: Triton's
pipeliner stages descriptor loads in shared memory with asynchronous copies, NUM_STAGES steps
ahead, so one or two programs an SM can keep a deep stream in flight at little register cost.

Program p streams tiles p, p + G, ... of BLOCK_N rows, each in K steps of BLOCK_K columns (a TMA
box holds at most 256 elements a dimension), as one loop of steps that the pipeliner overlaps:
out[rows] = sum over the row's steps of w_tile * x_chunk. Rows past N read zeros (the
descriptor's padding) and are not stored.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .pdl import launch_args, wait_for_inputs


@triton.jit
def _tma_gemv_kernel(x_ptr, w_desc, out_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     NUM_STAGES: tl.constexpr, PDL: tl.constexpr):
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    n_tiles = tl.cdiv(N, BLOCK_N)
    k_steps = tl.cdiv(K, BLOCK_K)
    steps = tl.cdiv(n_tiles - pid, G) * k_steps
    rk = tl.arange(0, BLOCK_K)
    rn = tl.arange(0, BLOCK_N)
    wait_for_inputs(PDL)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for s in tl.range(steps, num_stages=NUM_STAGES):
        row0 = (pid + (s // k_steps) * G) * BLOCK_N
        k0 = (s % k_steps) * BLOCK_K
        w = w_desc.load([row0, k0])
        x = tl.load(x_ptr + k0 + rk, mask=k0 + rk < K, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        if s % k_steps == k_steps - 1:
            tl.store(out_ptr + row0 + rn, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=row0 + rn < N)
            acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)


def descriptor(w: torch.Tensor, block_n: int, block_k: int) -> TensorDescriptor:
    """The weight's descriptor for tiles of block_n x block_k (made once per weight: a launch takes it by value)."""
    return TensorDescriptor.from_tensor(w, [block_n, block_k])


def tma_gemv(x: torch.Tensor, w: torch.Tensor, programs: int, block_n: int = 32, block_k: int = 256,
             num_stages: int = 4, num_warps: int = 4, desc: TensorDescriptor | None = None) -> torch.Tensor:
    """x [K] @ w [N, K].T -> [N] in x's dtype, programs programs streaming the weight through TMA."""
    N, K = w.shape
    if block_k > 256 or block_n > 256:
        raise ValueError(f"tma gemv: a TMA box is at most 256 elements a side, not {block_n} x {block_k}")
    out = torch.empty(N, dtype=x.dtype, device=x.device)
    desc = desc if desc is not None else descriptor(w, block_n, block_k)
    _tma_gemv_kernel[(min(programs, triton.cdiv(N, block_n)),)](
        x, desc, out, N, K, BLOCK_N=block_n, BLOCK_K=block_k, NUM_STAGES=num_stages, num_warps=num_warps,
        **launch_args(x.device))
    return out
