"""Session 32 scratch: the persistent chain with the product on the tensor cores.

Each step's weights are KB tiles of [8 rows, 8 chunks, 64] (one TMA box each, 128-byte swizzle),
which is a [64, 64] wgmma A operand whose line r * 8 + c holds chunk c of row r. The input row
sits in shared memory as [K / 512, 8, 64]: k-group j is a [8, 64] B operand (K-major) whose line c
is chunk c of the row. So D = A @ B^T over all of a row group's k-groups holds, on its diagonal
c == c', every row's sum over its chunks: y[r] = sum_c D[r * 8 + c, c]. Eight times the FMAs of
the gemv, all on the tensor cores, and the weights never pass through registers.
"""
from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor


@gluon.jit
def _issue(pl, pr, pt, pk, live, slot, bars, ring, qkv_desc, o_desc, gu_desc, down_desc, pid,
           KB: gl.constexpr, H: gl.constexpr, I: gl.constexpr, NQKV: gl.constexpr, G: gl.constexpr):
    """KB TMA boxes of [8, 8, 64] (the weight seen as [rows, K / 64, 64]) into slot `slot`."""
    if live:
        bar = bars.index(slot)
        mbarrier.expect(bar, KB * 8192)
        for g in gl.static_range(KB):
            kc = (pk * KB + g) * 8
            dst = ring.index(slot * KB + g)
            if pr == 0:
                tma.async_copy_global_to_shared(qkv_desc, [pl * NQKV + pid * (NQKV // G) + pt * 8, kc, 0], bar, dst)
            elif pr == 1:
                tma.async_copy_global_to_shared(o_desc, [pl * H + pid * (H // G) + pt * 8, kc, 0], bar, dst)
            elif pr == 2:
                tma.async_copy_global_to_shared(gu_desc, [pl * 2 * I + pid * (2 * I // G) + pt * 8, kc, 0], bar, dst)
            else:
                tma.async_copy_global_to_shared(down_desc, [pl * H + pid * (H // G) + pt * 8, kc, 0], bar, dst)


@gluon.jit
def _advance(pl, pr, pt, pk, H: gl.constexpr, I: gl.constexpr, NQKV: gl.constexpr, G: gl.constexpr,
             KB: gl.constexpr):
    """The producer's next step: K step, then row group, then role, then layer."""
    ks = gl.where(pr == 3, I // (KB * 512), H // (KB * 512))
    tiles = gl.where(pr == 0, NQKV // G // 8, gl.where(pr == 2, 2 * I // G // 8, H // G // 8))
    pk = pk + 1
    wrap_k = pk == ks
    pk = gl.where(wrap_k, 0, pk)
    pt = gl.where(wrap_k, pt + 1, pt)
    wrap_t = pt == tiles
    pt = gl.where(wrap_t, 0, pt)
    pr = gl.where(wrap_t, pr + 1, pr)
    wrap_r = pr == 4
    pr = gl.where(wrap_r, 0, pr)
    pl = gl.where(wrap_r, pl + 1, pl)
    return pl, pr, pt, pk


@gluon.jit
def _now():
    return gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=gl.int64, is_pure=False, pack=1)


@gluon.jit
def _stamp(stamps_ptr, stage, which, pid, G: gl.constexpr):
    t = _now()
    if gl.program_id(0) >= 0:
        gl.store(stamps_ptr + (stage * 2 + which) * G + pid, t)


@gluon.jit
def _signal_own(count_ptr, stage, pid):
    """This program has stored its rows of matrix `stage`: its own flag word."""
    gl.thread_barrier()
    gl.atomic_xchg(count_ptr + 64 + pid, stage + 1, sem="release")


@gluon.jit
def _wait_all(count_ptr, stage, G: gl.constexpr, FL: gl.constexpr):
    """Until every program's flag word says matrix stage - 1 is stored (relaxed polls, then a fence)."""
    f = count_ptr + 64 + gl.arange(0, G, layout=FL)
    seen = gl.load(f, volatile=True)
    while gl.min(seen, axis=None) < stage:
        seen = gl.load(f, volatile=True)
    gl.inline_asm_elementwise("fence.acq_rel.gpu; mov.u32 $0, 0;", "=r", [], dtype=gl.int32, is_pure=False, pack=1)
    gl.thread_barrier()


@gluon.jit
def _fill(x_smem, src_ptr, GATED: gl.constexpr, K: gl.constexpr, I: gl.constexpr, XL: gl.constexpr,
          PIECE: gl.constexpr):
    """The row into the first K // 64 lines of x_smem ([lines, 64]), PIECE elements' loads at once."""
    a = gl.arange(0, PIECE // 64, layout=gl.SliceLayout(1, XL))
    c = gl.arange(0, 64, layout=gl.SliceLayout(0, XL))
    offs = gl.expand_dims(a, 1) * 64 + gl.expand_dims(c, 0)
    gl.thread_barrier()  # (every warp's products of the last row are done: each waited for its wgmma)
    for p in gl.static_range(K // PIECE):
        if GATED:
            g = gl.load(src_ptr + p * PIECE + offs, cache_modifier=".cg").to(gl.float32)
            u = gl.load(src_ptr + I + p * PIECE + offs, cache_modifier=".cg").to(gl.float32)
            x = (g / (1.0 + gl.exp(-g)) * u).to(gl.bfloat16)
        else:
            x = gl.load(src_ptr + p * PIECE + offs, cache_modifier=".cg")
        x_smem.slice(p * (PIECE // 64), PIECE // 64).store(x)
    fence_async_shared()  # the generic proxy's stores before the tensor cores' reads
    gl.thread_barrier()


@gluon.jit
def _boundary(x_fill, src_ptr, count_ptr, stamps_ptr, stage, pid, SYNC: gl.constexpr, GATED: gl.constexpr,
              K: gl.constexpr, I: gl.constexpr, XL: gl.constexpr, G: gl.constexpr, FL: gl.constexpr,
              PIECE: gl.constexpr):
    if SYNC == 3:
        _stamp(stamps_ptr, stage, 0, pid, G)
        _signal_own(count_ptr, stage, pid)
        _wait_all(count_ptr, stage + 1, G, FL)
        _stamp(stamps_ptr, stage, 1, pid, G)
    if SYNC >= 100:  # a stall of SYNC ns instead of the wait, no memory traffic (does the ring absorb it?)
        t0 = _now()
        while _now() - t0 < SYNC:
            pass
    _fill(x_fill, src_ptr, GATED, K, I, XL, PIECE)


@gluon.jit
def _diagonal(acc, AL: gl.constexpr, PL: gl.constexpr):
    """y[r] = sum_c acc[r * 8 + c, c] for the 8 rows of a [64, 8] accumulator."""
    rows = gl.arange(0, 64, layout=gl.SliceLayout(1, AL))
    cols = gl.arange(0, 8, layout=gl.SliceLayout(0, AL))
    d = gl.where(gl.expand_dims(rows % 8, 1) == gl.expand_dims(cols, 0), acc, 0.0)
    s = gl.convert_layout(gl.sum(d, axis=1), gl.SliceLayout(1, PL))
    rows2 = gl.arange(0, 64, layout=gl.SliceLayout(1, PL))
    rr = gl.arange(0, 8, layout=gl.SliceLayout(0, PL))
    return gl.sum(gl.where(gl.expand_dims(rows2 // 8, 1) == gl.expand_dims(rr, 0), gl.expand_dims(s, 1), 0.0), axis=0)


@gluon.jit
def _matrix(c, pl, pr, pt, pk, total, bars, ring, a_ring, x_b, buf_ptr, out_off, qkv_desc, o_desc, gu_desc, down_desc,
            pid, TILES: gl.constexpr, KS: gl.constexpr, NB: gl.constexpr, KB: gl.constexpr, H: gl.constexpr,
            I: gl.constexpr, NQKV: gl.constexpr, G: gl.constexpr, AL: gl.constexpr, PL: gl.constexpr):
    rr = gl.arange(0, 8, layout=gl.SliceLayout(0, PL))
    for t in range(TILES):
        acc = gl.full([64, 8], 0.0, gl.float32, AL)
        for k in range(KS):
            gl.thread_barrier()  # every warp's products of the slot the next TMA refills are done
            _issue(pl, pr, pt, pk, c + NB - 1 < total, (c + NB - 1) % NB, bars, ring, qkv_desc, o_desc, gu_desc,
                   down_desc, pid, KB, H, I, NQKV, G)
            pl, pr, pt, pk = _advance(pl, pr, pt, pk, H, I, NQKV, G, KB)
            slot = c % NB
            mbarrier.wait(bars.index(slot), (c // NB) & 1)
            for g in gl.static_range(KB):
                acc = warpgroup_mma(a_ring.index(slot * KB + g), x_b.index(k * KB + g).permute((1, 0)), acc,
                                    is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            c += 1
        y = _diagonal(acc, AL, PL)
        gl.store(buf_ptr + out_off + t * 8 + rr, y.to(gl.bfloat16))
    return c, pl, pr, pt, pk


@gluon.jit
def _chain3_kernel(x_ptr, buf_ptr, count_ptr, qkv_desc, o_desc, gu_desc, down_desc, L, stamps_ptr,
                   H: gl.constexpr, I: gl.constexpr, NQKV: gl.constexpr, G: gl.constexpr,
                   KB: gl.constexpr, NB: gl.constexpr, SYNC: gl.constexpr, GPIECE: gl.constexpr):
    pid = gl.program_id(0)
    num_warps: gl.constexpr = gl.num_warps()
    AL: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, 8, 16])
    PL: gl.constexpr = gl.BlockedLayout([1, 1], [4, 8], [num_warps, 1], [1, 0])
    XL: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    FL: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
    SW: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    KSH: gl.constexpr = H // (KB * 512)
    KSI: gl.constexpr = I // (KB * 512)
    T_QKV: gl.constexpr = NQKV // G // 8
    T_H: gl.constexpr = H // G // 8
    T_GU: gl.constexpr = 2 * I // G // 8
    O_OFF: gl.constexpr = NQKV
    GU_OFF: gl.constexpr = NQKV + H
    D_OFF: gl.constexpr = NQKV + H + 2 * I
    total = L * (T_QKV * KSH + T_H * KSH + T_GU * KSH + T_H * KSI)

    ring = gl.allocate_shared_memory(gl.bfloat16, [NB * KB, 8, 8, 64], qkv_desc.layout)
    a_ring = ring._reinterpret(gl.bfloat16, [NB * KB, 64, 64], SW)
    bars = gl.allocate_shared_memory(gl.int64, [NB, 1], mbarrier.MBarrierLayout())
    x_fill = gl.allocate_shared_memory(gl.bfloat16, [I // 64, 64], SW)
    x_smem = x_fill._reinterpret(gl.bfloat16, [I // 512, 8, 64], SW)
    for i in gl.static_range(NB):
        mbarrier.init(bars.index(i), count=1)
    pl = pid * 0
    pr = pid * 0
    pt = pid * 0
    pk = pid * 0
    for i in gl.static_range(NB - 1):
        _issue(pl, pr, pt, pk, i < total, i, bars, ring, qkv_desc, o_desc, gu_desc, down_desc, pid, KB, H, I, NQKV, G)
        pl, pr, pt, pk = _advance(pl, pr, pt, pk, H, I, NQKV, G, KB)
    c = pid * 0
    for layer in range(L):
        s = 4 * layer
        if layer == 0:
            _fill(x_fill, x_ptr, False, H, I, XL, 2048)
        else:
            _boundary(x_fill, buf_ptr + D_OFF, count_ptr, stamps_ptr, s - 1, pid, SYNC, False, H, I, XL, G, FL, 2048)
        c, pl, pr, pt, pk = _matrix(c, pl, pr, pt, pk, total, bars, ring, a_ring, x_smem, buf_ptr, pid * (NQKV // G),
                                    qkv_desc, o_desc, gu_desc, down_desc, pid, T_QKV, KSH, NB, KB, H, I, NQKV, G, AL, PL)
        _boundary(x_fill, buf_ptr, count_ptr, stamps_ptr, s, pid, SYNC, False, H, I, XL, G, FL, 2048)
        c, pl, pr, pt, pk = _matrix(c, pl, pr, pt, pk, total, bars, ring, a_ring, x_smem, buf_ptr,
                                    O_OFF + pid * (H // G), qkv_desc, o_desc, gu_desc, down_desc, pid, T_H, KSH, NB, KB,
                                    H, I, NQKV, G, AL, PL)
        _boundary(x_fill, buf_ptr + O_OFF, count_ptr, stamps_ptr, s + 1, pid, SYNC, False, H, I, XL, G, FL, 2048)
        c, pl, pr, pt, pk = _matrix(c, pl, pr, pt, pk, total, bars, ring, a_ring, x_smem, buf_ptr,
                                    GU_OFF + pid * (2 * I // G), qkv_desc, o_desc, gu_desc, down_desc, pid, T_GU, KSH, NB,
                                    KB, H, I, NQKV, G, AL, PL)
        _boundary(x_fill, buf_ptr + GU_OFF, count_ptr, stamps_ptr, s + 2, pid, SYNC, True, I, I, XL, G, FL, GPIECE)
        c, pl, pr, pt, pk = _matrix(c, pl, pr, pt, pk, total, bars, ring, a_ring, x_smem, buf_ptr,
                                    D_OFF + pid * (H // G), qkv_desc, o_desc, gu_desc, down_desc, pid, T_H, KSI, NB, KB,
                                    H, I, NQKV, G, AL, PL)
    for i in gl.static_range(NB):
        mbarrier.invalidate(bars.index(i))
    gl.thread_barrier()
    if gl.atomic_add(count_ptr + 1, 1, sem="acq_rel") == G - 1:
        gl.atomic_xchg(count_ptr + 1, 0, sem="relaxed")
        f = gl.arange(0, G, layout=FL)
        gl.atomic_xchg(count_ptr + 64 + f, gl.full([G], 0, gl.int32, FL), sem="relaxed")


def descriptors(ws):
    layout = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=3)
    out = []
    for w in ws:
        flat = w.reshape(-1, w.shape[-1] // 64, 64)
        out.append(TensorDescriptor(flat, list(flat.shape), list(flat.stride()), [8, 8, 64], layout))
    return out


def gluon_chain3(x, qkv_w, o_w, gu_w, down_w, programs=128, kb=4, stages=6, num_warps=4, counter=None, sync=3,
                 descs=None, stamps=None, gpiece=4096):
    L, NQKV, H = qkv_w.shape
    I = down_w.shape[2]
    if counter is None:
        counter = torch.zeros(64 + programs, dtype=torch.int32, device=x.device)
    if descs is None:
        descs = descriptors((qkv_w, o_w, gu_w, down_w))
    buf = torch.empty(NQKV + H + 2 * I + H, dtype=x.dtype, device=x.device)
    if stamps is None:
        stamps = torch.zeros(4 * L * 2 * programs, dtype=torch.int64, device=x.device)
    _chain3_kernel[(programs,)](x, buf, counter, *descs, L, stamps, H=H, I=I, NQKV=NQKV, G=programs,
                                KB=kb, NB=stages, SYNC=int(sync), GPIECE=gpiece, num_warps=num_warps)
    return buf[NQKV + H + 2 * I:]
