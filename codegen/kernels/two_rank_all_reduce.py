"""The sum of a small tensor over two ranks, in one kernel that talks to the peer GPU directly.

A tensor-parallel decode step all-reduces the hidden state twice a layer: 8 KB at batch 1 on the
Llama-3.1-8B shape. NCCL spends more time on such a message than moving it takes (a kernel of its
own, its protocol's handshakes, and `ops.all_reduce`'s copy of the input before NCCL sums in
place), and at TP=2 the 64 of them a step are what keeps the speedup from 2x.

Here each rank holds, in memory its peer can address (torch's symmetric memory: NVLink, mapped
into both processes), a receive buffer of two slots and one flag per program. A call, on each
rank, per program of BLOCK elements:

1. store its chunk of the input into the peer's receive buffer, in slot `epoch % 2`;
2. publish `epoch` in the peer's flag for this program (a release at system scope, after a barrier:
   every thread's stores of step 1 are visible to the peer before the flag is);
3. wait until its own flag, which the peer sets the same way, reaches `epoch` (an acquire);
4. sum its chunk and the peer's, in float32 (the same sum on both ranks: float addition of two
   terms commutes), into a fresh output.

`epoch` counts this program's calls (a per-program counter in local memory, bumped at the end):
both ranks make the same calls in the same order, as they do NCCL's. Two slots are enough: a rank
can be at most one call ahead of its peer (it cannot finish call n + 1 before the peer has
published n + 1, which the peer does only after finishing call n), so it never overwrites the slot
the peer is still reading. A peer that never arrives (its process died) would spin the GPU
forever: the wait gives up after `max_spins` polls and fails a device-side assert, so the step
raises instead of handing on a sum with garbage in it. That error is sticky: every later CUDA call
in the process fails too. Rank 0 then finds the dead worker and shuts the group down, as it does
when an NCCL collective fails (runtime/tensor_parallel.py).

Tested on CPU with two processes over shared memory under the Triton interpreter: the kernel
alone (tests/codegen/test_two_rank_all_reduce.py) and inside TP=2 engines over gloo
(tests/runtime/test_tensor_parallel.py, where a shared-memory file stands in for symmetric memory). On GPUs it is off unless KILN_TWO_RANK_ALL_REDUCE=1
(`TensorParallel.enable_small_all_reduce`): check it with `KILN_TWO_RANK_ALL_REDUCE=1 python
benchmarks/check_tensor_parallel.py --compiled --dtype float32`, time it with `scale_out.py
--two-rank-all-reduce`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.codegen.kernels.pdl import launch_args, wait_for_inputs

BLOCK = 1024  # elements a program moves (2 KB in bf16: batch-1 Llama-8B is 4 programs)
# Polls of the flag before a program gives up on its peer: minutes on a GPU (a poll is a barrier and
# a load), longer than ranks drift apart while one compiles what the other found in its cache.
MAX_SPINS = 1 << 28


@triton.jit(debug=True)  # (for the device_assert: a peer that never arrives is an error, not garbage)
def _two_rank_all_reduce_kernel(x_ptr, out_ptr, recv_ptr, peer_recv_ptr, flags_ptr, peer_flags_ptr, epochs_ptr,
                                n, slot_stride, max_spins, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    epoch = tl.load(epochs_ptr + pid) + 1
    slot = epoch % 2
    mine = tl.load(x_ptr + offs, mask=mask)
    tl.store(peer_recv_ptr + slot * slot_stride + offs, mine, mask=mask)
    tl.debug_barrier()  # every thread's stores issued before the flag's release
    tl.atomic_xchg(peer_flags_ptr + pid, epoch, sem="release", scope="sys")
    seen = tl.atomic_add(flags_ptr + pid, 0, sem="acquire", scope="sys")
    spins = 0
    while (seen < epoch) & (spins < max_spins):
        seen = tl.atomic_add(flags_ptr + pid, 0, sem="acquire", scope="sys")
        spins += 1
    tl.device_assert(seen >= epoch, "two_rank_all_reduce: the peer rank never arrived (its process died?)")
    theirs = tl.load(recv_ptr + slot * slot_stride + offs, mask=mask, cache_modifier=".cg")
    tl.store(out_ptr + offs, (mine.to(tl.float32) + theirs.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(epochs_ptr + pid, epoch)


class TwoRankAllReduce:
    """One rank's side, called as `ops.all_reduce`'s small path (`takes(x)`, then `self(x)`): its
    receive buffer [2, capacity] and flags [capacity / BLOCK] (in memory the peer can write), the
    peer's same two as this process sees them, and this rank's per-program call counters. The flags
    and counters must start at zero on both ranks."""

    def __init__(self, recv: torch.Tensor, peer_recv: torch.Tensor, flags: torch.Tensor, peer_flags: torch.Tensor):
        if recv.shape != peer_recv.shape or recv.dim() != 2 or recv.shape[0] != 2:
            raise ValueError(f"receive buffers must both be [2, capacity], got {tuple(recv.shape)} and "
                             f"{tuple(peer_recv.shape)}")
        programs = triton.cdiv(recv.shape[1], BLOCK)
        if flags.numel() < programs or peer_flags.numel() < programs or flags.dtype != torch.int32:
            raise ValueError(f"need {programs} int32 flags a rank for a capacity of {recv.shape[1]}")
        self.recv, self.peer_recv, self.flags, self.peer_flags = recv, peer_recv, flags, peer_flags
        self.epochs = torch.zeros(programs, dtype=torch.int32, device=recv.device)

    @property
    def capacity(self) -> int:
        return self.recv.shape[1]

    def takes(self, x: torch.Tensor) -> bool:
        return x.device == self.recv.device and x.dtype == self.recv.dtype and x.numel() <= self.capacity

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return two_rank_all_reduce(x, self)


def two_rank_all_reduce(x: torch.Tensor, buffers: TwoRankAllReduce, max_spins: int = MAX_SPINS) -> torch.Tensor:
    """x summed with the peer rank's x (which calls this at the same point), in a new tensor."""
    if not buffers.takes(x):
        raise ValueError(f"two_rank_all_reduce takes {buffers.recv.dtype} tensors of at most {buffers.capacity} "
                         f"elements on {buffers.recv.device}, got {x.dtype} [{x.numel()}] on {x.device}")
    x = x.contiguous()
    out = torch.empty_like(x)
    n = x.numel()
    if n == 0:
        return out
    _two_rank_all_reduce_kernel[(triton.cdiv(n, BLOCK),)](
        x, out, buffers.recv, buffers.peer_recv, buffers.flags, buffers.peer_flags, buffers.epochs,
        n, buffers.recv.stride(0), max_spins, BLOCK=BLOCK, num_warps=4, **launch_args(x.device))
    return out
