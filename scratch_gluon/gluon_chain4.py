"""Session 32 scratch: chain3 with a producer warp of its own (gl.warp_specialize).

The producer walks every step of every matrix of every layer, issuing the TMA of step n once its
slot is free (the consumer's `empty` arrival for step n - NB) and once step n - X has landed: at
most X steps in flight, so control traffic (flags, the input row) does not queue behind a deep
stream, while the NB-slot ring keeps filling during the consumer's waits. The consumer (the default
partition's warpgroup) multiplies on the tensor cores as chain3 and releases each slot after its
products.
"""
from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, warpgroup_mma, \
    warpgroup_mma_wait

from gluon_chain3 import _advance, _boundary, _diagonal, _fill, _issue, descriptors


@gluon.jit
def _producer(ring, full, empty, qkv_desc, o_desc, gu_desc, down_desc, L, H: gl.constexpr, I: gl.constexpr,
              NQKV: gl.constexpr, G: gl.constexpr, KB: gl.constexpr, NB: gl.constexpr, X: gl.constexpr):
    pid = gl.program_id(0)
    KSH: gl.constexpr = H // (KB * 512)
    KSI: gl.constexpr = I // (KB * 512)
    total = L * ((NQKV // G // 8) * KSH + (H // G // 8) * KSH + (2 * I // G // 8) * KSH + (H // G // 8) * KSI)
    pl = pid * 0
    pr = pid * 0
    pt = pid * 0
    pk = pid * 0
    for n in range(total):
        slot = n % NB
        if n >= NB:  # the consumer is done with step n - NB in this slot
            mbarrier.wait(empty.index(slot), ((n // NB) - 1) & 1)
        if n >= X:  # at most X steps in flight
            m = n - X
            mbarrier.wait(full.index(m % NB), (m // NB) & 1)
        _issue(pl, pr, pt, pk, True, slot, full, ring, qkv_desc, o_desc, gu_desc, down_desc, pid, KB, H, I, NQKV, G)
        pl, pr, pt, pk = _advance(pl, pr, pt, pk, H, I, NQKV, G, KB)


@gluon.jit
def _ll_piece(ptr, offs, epoch):
    """bf16 values from LL words ((epoch << 16) | bits) at ptr + offs, re-read until all carry `epoch`."""
    w = gl.load(ptr + offs, volatile=True)
    while gl.min(((w >> 16) & 0xFFFF) == epoch, axis=None) == 0:
        w = gl.load(ptr + offs, volatile=True)
    return (w & 0xFFFF).to(gl.int16).to(gl.bfloat16, bitcast=True)


@gluon.jit
def _fill_ll(x_smem, src_ptr, epoch, GATED: gl.constexpr, K: gl.constexpr, I: gl.constexpr, XL: gl.constexpr,
             PIECE: gl.constexpr):
    """`_fill` from LL words: each piece waits for its own values; no flag, no fence."""
    a = gl.arange(0, PIECE // 64, layout=gl.SliceLayout(1, XL))
    c = gl.arange(0, 64, layout=gl.SliceLayout(0, XL))
    offs = gl.expand_dims(a, 1) * 64 + gl.expand_dims(c, 0)
    gl.thread_barrier()
    for p in gl.static_range(K // PIECE):
        if GATED:
            g = _ll_piece(src_ptr + p * PIECE, offs, epoch).to(gl.float32)
            u = _ll_piece(src_ptr + I + p * PIECE, offs, epoch).to(gl.float32)
            x = (g / (1.0 + gl.exp(-g)) * u).to(gl.bfloat16)
        else:
            x = _ll_piece(src_ptr + p * PIECE, offs, epoch)
        x_smem.slice(p * (PIECE // 64), PIECE // 64).store(x)
    fence_async_shared()
    gl.thread_barrier()


@gluon.jit
def _epoch(base, stage):
    return (base + stage) % 65535 + 1


@gluon.jit
def _in(x_fill, buf_ptr, ll_ptr, off, count_ptr, stamps_ptr, stage, base, pid, SYNC: gl.constexpr,
        GATED: gl.constexpr, K: gl.constexpr, I: gl.constexpr, XL: gl.constexpr, G: gl.constexpr, FL: gl.constexpr,
        PIECE: gl.constexpr):
    """The next matrix's input row: after a flag wait (SYNC 3) or from LL words (SYNC 2)."""
    if SYNC == 2:
        _fill_ll(x_fill, ll_ptr + off, _epoch(base, stage), GATED, K, I, XL, PIECE)
    else:
        _boundary(x_fill, buf_ptr + off, count_ptr, stamps_ptr, stage, pid, SYNC, GATED, K, I, XL, G, FL, PIECE)


@gluon.jit
def _matrix(c, full, empty, a_ring, x_b, buf_ptr, ll_ptr, epoch, out_off, TILES: gl.constexpr, KS: gl.constexpr, NB: gl.constexpr,
            KB: gl.constexpr, AL: gl.constexpr, PL: gl.constexpr, PIPE: gl.constexpr, LL: gl.constexpr):
    """PIPE: a step's products are waited for (and its slot released) only after the next step's are
    issued, so the tensor cores always have the next step's work queued."""
    rr = gl.arange(0, 8, layout=gl.SliceLayout(0, PL))
    for t in range(TILES):
        acc = gl.full([64, 8], 0.0, gl.float32, AL)
        for k in range(KS):
            slot = c % NB
            mbarrier.wait(full.index(slot), (c // NB) & 1)
            for g in gl.static_range(KB):
                acc = warpgroup_mma(a_ring.index(slot * KB + g), x_b.index(k * KB + g).permute((1, 0)), acc,
                                    is_async=True)
            if PIPE:
                acc = warpgroup_mma_wait(num_outstanding=KB, deps=(acc,))
                if k > 0:  # the step before's products are done: its slot back to the producer
                    gl.thread_barrier()
                    mbarrier.arrive(empty.index((c + NB - 1) % NB), count=1)
            else:
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
                gl.thread_barrier()  # every warp's products of the slot done
                mbarrier.arrive(empty.index(slot), count=1)
            c += 1
        if PIPE:
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            gl.thread_barrier()
            mbarrier.arrive(empty.index((c + NB - 1) % NB), count=1)
        y = _diagonal(acc, AL, PL)
        yb = y.to(gl.bfloat16)
        gl.store(buf_ptr + out_off + t * 8 + rr, yb)
        if LL:
            bits = yb.to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
            gl.store(ll_ptr + out_off + t * 8 + rr, bits | (epoch << 16))
    return c


@gluon.jit
def _consumer(a_ring, full, empty, x_fill, x_smem, x_ptr, buf_ptr, ll_ptr, count_ptr, stamps_ptr, L, H: gl.constexpr,
              I: gl.constexpr, NQKV: gl.constexpr, G: gl.constexpr, KB: gl.constexpr, NB: gl.constexpr,
              SYNC: gl.constexpr, GPIECE: gl.constexpr, PIPE: gl.constexpr):
    pid = gl.program_id(0)
    num_warps: gl.constexpr = gl.num_warps()
    AL: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, 8, 16])
    PL: gl.constexpr = gl.BlockedLayout([1, 1], [4, 8], [num_warps, 1], [1, 0])
    XL: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    FL: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
    KSH: gl.constexpr = H // (KB * 512)
    KSI: gl.constexpr = I // (KB * 512)
    T_QKV: gl.constexpr = NQKV // G // 8
    T_H: gl.constexpr = H // G // 8
    T_GU: gl.constexpr = 2 * I // G // 8
    O_OFF: gl.constexpr = NQKV
    GU_OFF: gl.constexpr = NQKV + H
    D_OFF: gl.constexpr = NQKV + H + 2 * I
    c = pid * 0
    base = gl.load(count_ptr + 2) * (4 * L)  # (the LL words' epochs: this launch's, past the last one's)
    LL: gl.constexpr = SYNC == 2
    for layer in range(L):
        s = 4 * layer
        if layer == 0:
            _fill(x_fill, x_ptr, False, H, I, XL, 2048)
        else:
            _in(x_fill, buf_ptr, ll_ptr, D_OFF, count_ptr, stamps_ptr, s - 1, base, pid, SYNC, False, H, I, XL, G, FL,
                2048)
        c = _matrix(c, full, empty, a_ring, x_smem, buf_ptr, ll_ptr, _epoch(base, s), pid * (NQKV // G), T_QKV, KSH,
                    NB, KB, AL, PL, PIPE, LL)
        _in(x_fill, buf_ptr, ll_ptr, 0, count_ptr, stamps_ptr, s, base, pid, SYNC, False, H, I, XL, G, FL, 2048)
        c = _matrix(c, full, empty, a_ring, x_smem, buf_ptr, ll_ptr, _epoch(base, s + 1), O_OFF + pid * (H // G), T_H,
                    KSH, NB, KB, AL, PL, PIPE, LL)
        _in(x_fill, buf_ptr, ll_ptr, O_OFF, count_ptr, stamps_ptr, s + 1, base, pid, SYNC, False, H, I, XL, G, FL,
            2048)
        c = _matrix(c, full, empty, a_ring, x_smem, buf_ptr, ll_ptr, _epoch(base, s + 2), GU_OFF + pid * (2 * I // G),
                    T_GU, KSH, NB, KB, AL, PL, PIPE, LL)
        _in(x_fill, buf_ptr, ll_ptr, GU_OFF, count_ptr, stamps_ptr, s + 2, base, pid, SYNC, True, I, I, XL, G, FL,
            GPIECE)
        c = _matrix(c, full, empty, a_ring, x_smem, buf_ptr, ll_ptr, _epoch(base, s + 3), D_OFF + pid * (H // G), T_H,
                    KSI, NB, KB, AL, PL, PIPE, LL)
    # the launch's end: the last program to arrive puts the flags back for the next launch
    gl.thread_barrier()
    if gl.atomic_add(count_ptr + 1, 1, sem="acq_rel") == G - 1:
        gl.atomic_xchg(count_ptr + 1, 0, sem="relaxed")
        gl.atomic_add(count_ptr + 2, 1, sem="relaxed")
        f = gl.arange(0, G, layout=FL)
        gl.atomic_xchg(count_ptr + 64 + f, gl.full([G], 0, gl.int32, FL), sem="relaxed")


@gluon.jit
def _chain4_kernel(x_ptr, buf_ptr, ll_ptr, count_ptr, qkv_desc, o_desc, gu_desc, down_desc, L, stamps_ptr,
                   H: gl.constexpr, I: gl.constexpr, NQKV: gl.constexpr, G: gl.constexpr, KB: gl.constexpr,
                   NB: gl.constexpr, X: gl.constexpr, SYNC: gl.constexpr, GPIECE: gl.constexpr, PIPE: gl.constexpr):
    SW: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    ring = gl.allocate_shared_memory(gl.bfloat16, [NB * KB, 8, 8, 64], qkv_desc.layout)
    a_ring = ring._reinterpret(gl.bfloat16, [NB * KB, 64, 64], SW)
    full = gl.allocate_shared_memory(gl.int64, [NB, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NB, 1], mbarrier.MBarrierLayout())
    x_fill = gl.allocate_shared_memory(gl.bfloat16, [I // 64, 64], SW)
    x_smem = x_fill._reinterpret(gl.bfloat16, [I // 512, 8, 64], SW)
    for i in gl.static_range(NB):
        mbarrier.init(full.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    fence_async_shared()
    gl.warp_specialize([
        (_consumer, (a_ring, full, empty, x_fill, x_smem, x_ptr, buf_ptr, ll_ptr, count_ptr, stamps_ptr, L, H, I, NQKV, G, KB,
                     NB, SYNC, GPIECE, PIPE)),
        (_producer, (ring, full, empty, qkv_desc, o_desc, gu_desc, down_desc, L, H, I, NQKV, G, KB, NB, X)),
    ], [1], [48])
    for i in gl.static_range(NB):
        mbarrier.invalidate(full.index(i))
        mbarrier.invalidate(empty.index(i))


def gluon_chain4(x, qkv_w, o_w, gu_w, down_w, programs=128, kb=1, stages=22, inflight=5, num_warps=4, counter=None,
                 sync=3, descs=None, stamps=None, gpiece=4096, pipe=1, ll=None):
    L, NQKV, H = qkv_w.shape
    I = down_w.shape[2]
    if counter is None:
        counter = torch.zeros(64 + programs, dtype=torch.int32, device=x.device)
    if descs is None:
        descs = descriptors((qkv_w, o_w, gu_w, down_w))
    buf = torch.empty(NQKV + H + 2 * I + H, dtype=x.dtype, device=x.device)
    if stamps is None:
        stamps = torch.zeros(4 * L * 2 * programs, dtype=torch.int64, device=x.device)
    if ll is None:
        ll = torch.zeros(NQKV + H + 2 * I + H, dtype=torch.int32, device=x.device)
    _chain4_kernel[(programs,)](x, buf, ll, counter, *descs, L, stamps, H=H, I=I, NQKV=NQKV, G=programs, KB=kb,
                                NB=stages, X=inflight, SYNC=int(sync), GPIECE=gpiece, PIPE=int(pipe), num_warps=num_warps)
    return buf[NQKV + H + 2 * I:]
