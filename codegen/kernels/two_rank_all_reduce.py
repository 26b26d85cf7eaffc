"""The sum of a small tensor over two ranks, in one kernel that talks to the peer GPU directly.

A tensor-parallel decode step all-reduces the hidden state twice a layer: 8 KB at batch 1 on the
Llama-3.1-8B shape. NCCL spends more time on such a message than moving it takes (a kernel of its
own, its protocol's handshakes, and `ops.all_reduce`'s copy of the input before NCCL sums in
place), and at TP=2 the 64 of them a step are what keeps the speedup from 2x.

Here each rank holds, in memory its peer can address (torch's symmetric memory: NVLink, mapped
into both processes), a receive buffer of two slots (and, for "flags", one flag per program). A
call, on each rank, per program of BLOCK elements, in one of two protocols:

- "ll" (the default; after NCCL's low-latency protocol): store the chunk into the peer's slot
  `epoch % 2` as 8-byte words of 4 data bytes and the call's `epoch`; poll its own slot (volatile
  loads) until every word of the chunk carries `epoch`. An aligned 8-byte store arrives whole, so
  a word that shows the epoch holds the data: no flag, no fence. The words double the bytes moved,
  which at these sizes costs less than the fence's round trip.
- "flags": store the chunk as it is, then publish `epoch` in the peer's flag for this program (a
  release at system scope after a barrier: every thread's stores are visible to the peer before
  the flag is); wait until its own flag reaches `epoch` (an acquire), then load the peer's chunk.

Either way it then sums its chunk and the peer's in float32 (the same sum on both ranks: float
addition of two terms commutes) into a fresh output. Chained in a CUDA graph on two H200s, a call
of 4096 bf16 elements took 4.15 us with "ll", 4.95 with "flags" and 9.33 through NCCL
(benchmarks/all_reduce.py).

In "ll", the kernel that makes x may do the sending itself (`ll_send`, the row-parallel gemv's
programs as they finish their values: `quant_gemm.reduced_gemv`): the all-reduce launch after it
then only receives (`two_rank_all_reduce(x, buffers, send=False)`). The words and the epochs are
the kernel's, so those calls and the kernel's take turns in any order.

`epoch` counts this program's calls (a per-program counter in local memory, bumped at the end):
both ranks make the same calls in the same order, as they do NCCL's. Two slots are enough: a rank
can be at most one call ahead of its peer (it cannot finish call n + 1 before the peer has
published n + 1, which the peer does only after finishing call n), so it never overwrites the slot
the peer is still reading. A peer that never arrives (its process died) would spin the GPU
forever: the wait gives up after `max_spins` polls and fails a device-side assert, so the step
raises instead of handing on a sum with garbage in it. That error is sticky: every later CUDA call
in the process fails too. Rank 0 then finds the dead worker and shuts the group down, as it does
when an NCCL collective fails (runtime/tensor_parallel.py).

Tested on CPU with two processes over shared memory under the Triton interpreter, both protocols:
the kernel alone (tests/codegen/test_two_rank_all_reduce.py) and inside TP=2 engines over gloo
(tests/runtime/test_tensor_parallel.py, where a shared-memory file stands in for symmetric
memory). On GPUs it is the default at two ranks whose GPUs reach each other's memory
(`TensorParallel.enable_small_all_reduce`; KILN_TWO_RANK_ALL_REDUCE=0 turns it off); checked with
`benchmarks/check_tensor_parallel.py --compiled --dtype float32` (TP=2's tokens == TP=1's, both
protocols), timed with `benchmarks/all_reduce.py` and `benchmarks/scale_out.py`.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kiln.codegen.kernels.pdl import launch_args, wait_for_inputs

BLOCK = 1024  # elements a program moves (2 KB in bf16: batch-1 Llama-8B is 4 programs)
CHUNK = tl.constexpr(BLOCK)  # (the same, for the jit functions other kernels call)
# Polls of the flag before a program gives up on its peer: minutes on a GPU (a poll is a barrier and
# a load), longer than ranks drift apart while one compiles what the other found in its cache.
MAX_SPINS = 1 << 28


@triton.jit(debug=True)  # (for the device_assert: a peer that never arrives is an error, not garbage)
def _two_rank_all_reduce_kernel(x_ptr, out_ptr, recv_addr, peer_recv_addr, flags_addr, peer_flags_addr, epochs_ptr,
                                n, slot_stride, max_spins, BLOCK: tl.constexpr, PDL: tl.constexpr):
    # (the shared buffers come as addresses, as torch's own symmetric-memory kernels take them: the
    # peer's is another process's allocation mapped into this one, which Triton's launcher need not know)
    recv_ptr = recv_addr.to(tl.pointer_type(x_ptr.dtype.element_ty))
    peer_recv_ptr = peer_recv_addr.to(tl.pointer_type(x_ptr.dtype.element_ty))
    flags_ptr = flags_addr.to(tl.pointer_type(tl.int32))
    peer_flags_ptr = peer_flags_addr.to(tl.pointer_type(tl.int32))
    wait_for_inputs(PDL)
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    epoch = tl.load(epochs_ptr + pid) + 1  # (int32: wraps after 2^31 calls, a day of decoding; so the
    slot = epoch & 1  # slot is its low bit and the wait compares by difference, both right across the wrap)
    mine = tl.load(x_ptr + offs, mask=mask)
    tl.store(peer_recv_ptr + slot * slot_stride + offs, mine, mask=mask)
    tl.debug_barrier()  # every thread's stores issued before the flag's release
    tl.atomic_xchg(peer_flags_ptr + pid, epoch, sem="release", scope="sys")
    seen = tl.atomic_add(flags_ptr + pid, 0, sem="acquire", scope="sys")
    spins = 0
    while (seen - epoch < 0) & (spins < max_spins):  # (the peer may be a call ahead: seen == epoch + 1)
        seen = tl.atomic_add(flags_ptr + pid, 0, sem="acquire", scope="sys")
        spins += 1
    tl.device_assert(seen - epoch >= 0, "two_rank_all_reduce: the peer rank never arrived (its process died?)")
    theirs = tl.load(recv_ptr + slot * slot_stride + offs, mask=mask, cache_modifier=".cg")
    tl.store(out_ptr + offs, (mine.to(tl.float32) + theirs.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(epochs_ptr + pid, epoch)


@triton.jit
def _smaller(a, b):
    return tl.minimum(a, b)


@triton.jit
def _arrived(got, epoch):
    """Whether every word of `got` carries `epoch` (as 0 or 1). (Through tl.reduce and this module's
    own combine function rather than tl.min: Triton's standard library is compiled-only when triton
    was imported before TRITON_INTERPRET=1 was set, as in the runtime tests' engines.)"""
    return tl.reduce(((got >> 32).to(tl.uint32) == epoch.to(tl.uint32)).to(tl.int32), 0, _smaller)


@triton.jit
def _ll_words(vals, epoch, PER_WORD: tl.constexpr, WORDS: tl.constexpr):
    """A chunk of 16- or 32-bit values as "ll" words: PER_WORD values in the low 32 bits (the lower
    one first), the epoch's low 32 bits above them."""
    if PER_WORD == 2:
        lo, hi = tl.split(tl.reshape(vals.to(tl.uint16, bitcast=True).to(tl.uint32), (WORDS, 2)))
        data = lo | (hi << 16)
    else:
        data = vals.to(tl.uint32, bitcast=True)
    return data.to(tl.uint64) | (epoch.to(tl.uint32).to(tl.uint64) << 32)


@triton.jit
def _ll_values(got, dtype: tl.constexpr, PER_WORD: tl.constexpr, BLOCK: tl.constexpr):
    """`_ll_words`' inverse: the chunk's values, in `dtype`."""
    data = got.to(tl.uint32)
    if PER_WORD == 2:  # (one return: Triton 3.6 compiles the code after an early return's branch too)
        pair = tl.join((data & 0xFFFF).to(tl.uint16), (data >> 16).to(tl.uint16))
        vals = tl.reshape(pair, (BLOCK,)).to(dtype, bitcast=True)
    else:
        vals = data.to(dtype, bitcast=True)
    return vals


@triton.jit
def _ll_receive(ptrs, word_mask, epoch, max_spins):
    """(the words at ptrs, 1 when all of them carry `epoch` else 0): polled (volatile loads, so
    re-read each time) until they do or max_spins polls went by."""
    tag = epoch.to(tl.uint32).to(tl.uint64) << 32
    got = tl.load(ptrs, mask=word_mask, other=tag, volatile=True)
    arrived = _arrived(got, epoch)
    spins = 0
    while (arrived == 0) & (spins < max_spins):
        got = tl.load(ptrs, mask=word_mask, other=tag, volatile=True)
        arrived = _arrived(got, epoch)
        spins += 1
    return got, arrived


@triton.jit(debug=True)
def _two_rank_ll_kernel(x_ptr, out_ptr, recv_addr, peer_recv_addr, epochs_ptr, n, slot_stride, max_spins,
                        BLOCK: tl.constexpr, PER_WORD: tl.constexpr, PDL: tl.constexpr, SEND: tl.constexpr):
    """The "ll" protocol: each 8-byte word carries 4 bytes of data and the call's epoch, so a word
    that arrived is a word the reader may use, with no flag and no fence between data and flag.
    SEND off: the peer's kernel that made its x sent it already (`ll_send`), so only receive."""
    recv_ptr = recv_addr.to(tl.pointer_type(tl.uint64))
    peer_recv_ptr = peer_recv_addr.to(tl.pointer_type(tl.uint64))
    WORDS: tl.constexpr = BLOCK // PER_WORD
    wait_for_inputs(PDL)
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    words = pid * WORDS + tl.arange(0, WORDS)
    word_mask = words < (n + PER_WORD - 1) // PER_WORD
    epoch = tl.load(epochs_ptr + pid) + 1  # (wraps as the flags kernel's does; the tag is its low 32 bits)
    slot = epoch & 1
    mine = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if SEND:
        tl.store(peer_recv_ptr + slot * slot_stride + words, _ll_words(mine, epoch, PER_WORD, WORDS), mask=word_mask)
    got, arrived = _ll_receive(recv_ptr + slot * slot_stride + words, word_mask, epoch, max_spins)
    tl.device_assert(arrived != 0, "two_rank_all_reduce: the peer rank never arrived (its process died?)")
    theirs = _ll_values(got, x_ptr.dtype.element_ty, PER_WORD, BLOCK)
    tl.store(out_ptr + offs, (mine.to(tl.float32) + theirs.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(epochs_ptr + pid, epoch)


@triton.jit
def ll_send(vals, first, n, peer_recv_addr, epochs_ptr, slot_stride, COUNT: tl.constexpr, PER_WORD: tl.constexpr):
    """Send the values x[first:first + COUNT] of a row x of n (`vals`, in x's dtype) to the peer rank
    as `_two_rank_ll_kernel`'s program for their chunk would: words tagged with that chunk's next
    epoch, into its slot of the peer's buffer. COUNT divides BLOCK and first is a multiple of it (the
    values lie in one chunk). For a kernel whose programs each make a few values of x (the gemv's
    SEND): each sends its own as it makes them, with no fence and no count, and the all-reduce after
    the kernel, receiving only (`two_rank_all_reduce(x, buffers, send=False)`), waits for that epoch's
    words. The epochs it does not bump: the summing call does."""
    peer_recv_ptr = peer_recv_addr.to(tl.pointer_type(tl.uint64))
    WORDS: tl.constexpr = COUNT // PER_WORD
    epoch = tl.load(epochs_ptr + first // CHUNK) + 1
    words = first // PER_WORD + tl.arange(0, WORDS)
    tagged = _ll_words(vals, epoch, PER_WORD, WORDS)
    mask = words < (n + PER_WORD - 1) // PER_WORD
    tl.store(peer_recv_ptr + (epoch & 1) * slot_stride + words, tagged, mask=mask)


# "ll" (data and epoch in every word) or "flags" (data, then a flag per program behind a
# system-scope release); KILN_TWO_RANK_PROTOCOL picks it for a process, and the ranks of a group
# agree on one (runtime/tensor_parallel.py).
PROTOCOLS = ("flags", "ll")
PROTOCOL = os.environ.get("KILN_TWO_RANK_PROTOCOL", "ll")


def region_bytes(capacity: int) -> int:
    """The bytes of one rank's shared region for `capacity` elements: two slots of `capacity`
    8-byte words (what "ll" needs for any dtype; "flags" uses the front of them), then one int32
    flag per program; rounded up to 128 bytes, so regions laid end to end stay aligned."""
    return triton.cdiv(2 * capacity * 8 + 4 * triton.cdiv(capacity, BLOCK), 128) * 128


class TwoRankAllReduce:
    """One rank's side, called as `ops.all_reduce`'s small path (`takes(x)`, then `self(x)`): its
    shared region and the peer's as this process sees them (uint8 tensors of `region_bytes(capacity)`,
    in memory the peer can write; zeroed on both ranks before either calls), the dtype it sums, and
    this rank's per-program call counters."""

    def __init__(self, region: torch.Tensor, peer_region: torch.Tensor, dtype: torch.dtype, capacity: int,
                 protocol: str | None = None):
        protocol = protocol or PROTOCOL
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown two-rank all-reduce protocol {protocol!r}: one of {PROTOCOLS}")
        need = region_bytes(capacity)
        if region.dtype != torch.uint8 or region.numel() < need or peer_region.numel() < need:
            raise ValueError(f"a capacity of {capacity} needs uint8 regions of {need} bytes, got "
                             f"{region.numel()} and {peer_region.numel()}")
        if dtype.itemsize not in (2, 4):
            raise ValueError(f"two_rank_all_reduce sums 16- and 32-bit floats, not {dtype}")
        self.region, self.peer_region = region, peer_region
        self.dtype, self.protocol = dtype, protocol
        data, programs = 2 * capacity * 8, triton.cdiv(capacity, BLOCK)
        if protocol == "ll":
            self.recv, self.peer_recv = (r[:data].view(torch.int64).view(2, capacity) for r in (region, peer_region))
        else:
            size = 2 * capacity * dtype.itemsize
            self.recv, self.peer_recv = (r[:size].view(dtype).view(2, capacity) for r in (region, peer_region))
        self.flags, self.peer_flags = (r[data:data + 4 * programs].view(torch.int32) for r in (region, peer_region))
        self.epochs = torch.zeros(programs, dtype=torch.int32, device=region.device)

    @property
    def capacity(self) -> int:
        return self.recv.shape[1]

    def takes(self, x: torch.Tensor) -> bool:
        return x.device == self.recv.device and x.dtype == self.dtype and x.numel() <= self.capacity

    def takes_row(self, n: int, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether a kernel's programs can send a row of n `dtype` values on `device` to the peer as
        they make it (`ll_send`): the "ll" protocol's buffers only."""
        return self.protocol == "ll" and device == self.recv.device and dtype == self.dtype and n <= self.capacity

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return two_rank_all_reduce(x, self)


def two_rank_all_reduce(x: torch.Tensor, buffers: TwoRankAllReduce, max_spins: int = MAX_SPINS,
                        send: bool = True) -> torch.Tensor:
    """x summed with the peer rank's x (which calls this at the same point), in a new tensor.
    send=False ("ll" only): the kernels that made x on both ranks sent it already (`ll_send`), so
    this call only waits for the peer's words and sums."""
    if not buffers.takes(x):
        raise ValueError(f"two_rank_all_reduce takes {buffers.dtype} tensors of at most {buffers.capacity} "
                         f"elements on {buffers.recv.device}, got {x.dtype} [{x.numel()}] on {x.device}")
    if not send and buffers.protocol != "ll":
        raise ValueError(f"a receive-only call needs the \"ll\" protocol's buffers, got {buffers.protocol!r}")
    x = x.contiguous()
    out = torch.empty_like(x)
    n = x.numel()
    if n == 0:
        return out
    grid = (triton.cdiv(n, BLOCK),)
    if buffers.protocol == "ll":
        _two_rank_ll_kernel[grid](
            x, out, buffers.recv.data_ptr(), buffers.peer_recv.data_ptr(), buffers.epochs, n, buffers.recv.stride(0),
            max_spins, BLOCK=BLOCK, PER_WORD=4 // x.element_size(), SEND=send, num_warps=4, **launch_args(x.device))
    else:
        _two_rank_all_reduce_kernel[grid](
            x, out, buffers.recv.data_ptr(), buffers.peer_recv.data_ptr(), buffers.flags.data_ptr(),
            buffers.peer_flags.data_ptr(), buffers.epochs, n, buffers.recv.stride(0), max_spins, BLOCK=BLOCK,
            num_warps=4, **launch_args(x.device))
    return out
