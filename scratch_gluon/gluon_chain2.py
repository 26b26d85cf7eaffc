"""Session 31-32 scratch: gluon_chain with steps of KB boxes side by side and no per-step division (bench3 and bench4 import it)."""
from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor


@gluon.jit
def _issue(pl, pr, pt, pk, live, slot, bars, ring, qkv_desc, o_desc, gu_desc, down_desc, pid,
           BN: gl.constexpr, BK: gl.constexpr, KB: gl.constexpr, H: gl.constexpr, I: gl.constexpr,
           NQKV: gl.constexpr, G: gl.constexpr):
    """One TMA of a [BN, KB, BK] box (the weight seen as [rows, K / BK, BK]) into slot `slot`."""
    if live:
        bar = bars.index(slot)
        mbarrier.expect(bar, KB * BN * BK * 2)
        k0 = pk * KB
        dst = ring.index(slot)
        if pr == 0:
            tma.async_copy_global_to_shared(qkv_desc, [pl * NQKV + pid * (NQKV // G) + pt * BN, k0, 0], bar, dst)
        elif pr == 1:
            tma.async_copy_global_to_shared(o_desc, [pl * H + pid * (H // G) + pt * BN, k0, 0], bar, dst)
        elif pr == 2:
            tma.async_copy_global_to_shared(gu_desc, [pl * 2 * I + pid * (2 * I // G) + pt * BN, k0, 0], bar, dst)
        else:
            tma.async_copy_global_to_shared(down_desc, [pl * H + pid * (H // G) + pt * BN, k0, 0], bar, dst)


@gluon.jit
def _now():
    return gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=gl.int64, is_pure=False, pack=1)


@gluon.jit
def _advance(pl, pr, pt, pk, H: gl.constexpr, I: gl.constexpr, NQKV: gl.constexpr, G: gl.constexpr,
             BN: gl.constexpr, BK: gl.constexpr, KB: gl.constexpr):
    """The producer's next step: K step, then tile, then role, then layer."""
    ks = gl.where(pr == 3, I // (KB * BK), H // (KB * BK))
    tiles = gl.where(pr == 0, NQKV // G // BN, gl.where(pr == 2, 2 * I // G // BN, H // G // BN))
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
def _stamp(stamps_ptr, stage, which, pid, G: gl.constexpr):
    """The globaltimer at this program's signal (which 0) or wait's end (1) of a stage."""
    t = _now()
    if gl.program_id(0) >= 0:
        gl.store(stamps_ptr + (stage * 2 + which) * G + pid, t)


@gluon.jit
def _signal(count_ptr, stage, G: gl.constexpr, FL: gl.constexpr):
    gl.thread_barrier()
    if gl.atomic_add(count_ptr, 1, sem="acq_rel") == (stage + 1) * G - 1:
        f = gl.arange(0, G, layout=FL)
        gl.atomic_xchg(count_ptr + 32 + f * 32, gl.full([G], 0, gl.int32, FL) + stage + 1, sem="release")


@gluon.jit
def _wait(count_ptr, stage, pid, max_spins):
    """Poll this program's flag with acquire loads (one thread's atomic, its value broadcast), so
    every thread's later loads are ordered after the stores the flag stands for."""
    word = count_ptr + 32 + pid * 32
    seen = gl.atomic_add(word, 0, sem="acquire")
    spins = 0
    while (seen < stage) & (spins < max_spins):
        seen = gl.atomic_add(word, 0, sem="acquire")
        spins += 1
    gl.thread_barrier()


@gluon.jit
def _fill(x_smem, src_ptr, GATED: gl.constexpr, K: gl.constexpr, I: gl.constexpr, BK: gl.constexpr,
          KB: gl.constexpr, XL: gl.constexpr):
    """The row into x_smem[: K // (KB * BK)] ([K steps, KB, BK]), every load issued at once."""
    a = gl.arange(0, K // (KB * BK), layout=gl.SliceLayout(1, gl.SliceLayout(2, XL)))
    b = gl.arange(0, KB, layout=gl.SliceLayout(0, gl.SliceLayout(2, XL)))
    c = gl.arange(0, BK, layout=gl.SliceLayout(0, gl.SliceLayout(1, XL)))
    offs = (gl.expand_dims(gl.expand_dims(a, 1), 2) * (KB * BK) + gl.expand_dims(gl.expand_dims(b, 0), 2) * BK
            + gl.expand_dims(gl.expand_dims(c, 0), 1))
    if GATED:
        g = gl.load(src_ptr + offs, cache_modifier=".cg").to(gl.float32)
        u = gl.load(src_ptr + I + offs, cache_modifier=".cg").to(gl.float32)
        x = (g / (1.0 + gl.exp(-g)) * u).to(gl.bfloat16).to(gl.float32)
    else:
        x = gl.load(src_ptr + offs, cache_modifier=".cg").to(gl.float32)
    gl.thread_barrier()
    x_smem.slice(0, K // (KB * BK)).store(x.to(gl.bfloat16))
    gl.thread_barrier()


@gluon.jit
def _ll_values(ptr, offs, epoch):
    """Words at ptr + offs, re-read until every one carries `epoch`; their float values."""
    w = gl.load(ptr + offs, volatile=True)
    while gl.min((w >> 32).to(gl.int32) == epoch, axis=None) == 0:
        w = gl.load(ptr + offs, volatile=True)
    return (w & 0xFFFFFFFF).to(gl.int32).to(gl.float32, bitcast=True)


@gluon.jit
def _fill_ll(x_smem, src_ptr, epoch, GATED: gl.constexpr, K: gl.constexpr, I: gl.constexpr, BK: gl.constexpr,
             KB: gl.constexpr, XL: gl.constexpr):
    """`_fill` from LL words: each value waits for its own producer, no barrier between matrices."""
    a = gl.arange(0, K // (KB * BK), layout=gl.SliceLayout(1, gl.SliceLayout(2, XL)))
    b = gl.arange(0, KB, layout=gl.SliceLayout(0, gl.SliceLayout(2, XL)))
    c = gl.arange(0, BK, layout=gl.SliceLayout(0, gl.SliceLayout(1, XL)))
    offs = (gl.expand_dims(gl.expand_dims(a, 1), 2) * (KB * BK) + gl.expand_dims(gl.expand_dims(b, 0), 2) * BK
            + gl.expand_dims(gl.expand_dims(c, 0), 1))
    if GATED:
        g = _ll_values(src_ptr, offs, epoch)
        u = _ll_values(src_ptr + I, offs, epoch)
        x = (g / (1.0 + gl.exp(-g)) * u).to(gl.bfloat16)
    else:
        x = _ll_values(src_ptr, offs, epoch).to(gl.bfloat16)
    gl.thread_barrier()
    x_smem.slice(0, K // (KB * BK)).store(x)
    gl.thread_barrier()


@gluon.jit
def _signal_own(count_ptr, stage, pid):
    """This program has stored its rows of matrix `stage`: its own flag word (no count, nothing waited on)."""
    gl.thread_barrier()  # every thread's stores issued before the flag's release
    gl.atomic_xchg(count_ptr + 64 + pid, stage + 1, sem="release")


@gluon.jit
def _wait_all(count_ptr, stage, G: gl.constexpr, FL: gl.constexpr):
    """Until every program's flag word says matrix stage - 1 is stored: acquire loads of all G words."""
    f = count_ptr + 64 + gl.arange(0, G, layout=FL)
    seen = gl.load(f, volatile=True)
    while gl.min(seen, axis=None) < stage:
        seen = gl.load(f, volatile=True)
    # (relaxed reads, then a fence: an acquire for every thread's later loads)
    gl.inline_asm_elementwise("fence.acq_rel.gpu; mov.u32 $0, 0;", "=r", [], dtype=gl.int32, is_pure=False, pack=1)
    gl.thread_barrier()


@gluon.jit
def _boundary(x_fill, src_ptr, ll_src, count_ptr, stamps_ptr, stage, base, pid, max_spins, SYNC: gl.constexpr,
              GATED: gl.constexpr, K: gl.constexpr, I: gl.constexpr, BK: gl.constexpr, KB: gl.constexpr,
              XL: gl.constexpr, G: gl.constexpr, FL: gl.constexpr):
    """Between matrix `stage` and the next: SYNC 1 counts and waits, then fills the row; 2 fills it
    from the LL words of `stage` (each value waits for itself); 0 fills it without waiting."""
    if SYNC == 1:
        _stamp(stamps_ptr, stage, 0, pid, G)
        _signal(count_ptr, stage, G, FL)
        _wait(count_ptr, stage + 1, pid, max_spins)
        _stamp(stamps_ptr, stage, 1, pid, G)
    if SYNC == 3:
        _stamp(stamps_ptr, stage, 0, pid, G)
        _signal_own(count_ptr, stage, pid)
        _wait_all(count_ptr, stage + 1, G, FL)
        _stamp(stamps_ptr, stage, 1, pid, G)
    if SYNC == 2:
        _fill_ll(x_fill, ll_src, base + stage + 1, GATED, K, I, BK, KB, XL)
    else:
        _fill(x_fill, src_ptr, GATED, K, I, BK, KB, XL)


@gluon.jit
def _matrix(c, pl, pr, pt, pk, total, acc, bars, ring, x_smem, buf_ptr, out_off, qkv_desc, o_desc, gu_desc, down_desc,
            pid, ll_ptr, epoch, LL: gl.constexpr, TILES: gl.constexpr, KS: gl.constexpr, NB: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr,
            KB: gl.constexpr, H: gl.constexpr, I: gl.constexpr, NQKV: gl.constexpr, G: gl.constexpr,
            WL: gl.constexpr):
    rn = gl.arange(0, BN, layout=gl.SliceLayout(1, gl.SliceLayout(2, WL)))
    for t in range(TILES):
        acc = gl.full([BN, KB, BK], 0.0, gl.float32, WL)
        for k in range(KS):
            gl.thread_barrier()  # every warp done with the slot the next TMA refills
            fence_async_shared()  # (the generic proxy's reads of it before the async proxy's writes)
            _issue(pl, pr, pt, pk, c + NB - 1 < total, (c + NB - 1) % NB, bars, ring, qkv_desc, o_desc, gu_desc,
                   down_desc, pid, BN, BK, KB, H, I, NQKV, G)
            pl, pr, pt, pk = _advance(pl, pr, pt, pk, H, I, NQKV, G, BN, BK, KB)
            slot = c % NB
            mbarrier.wait(bars.index(slot), (c // NB) & 1)
            w = ring.index(slot).load(WL).to(gl.float32)
            x = x_smem.index(k).load(gl.SliceLayout(0, WL)).to(gl.float32)
            acc = acc + w * gl.expand_dims(x, 0)
            c += 1
        y = gl.sum(gl.sum(acc, axis=2), axis=1).to(gl.bfloat16)
        gl.store(buf_ptr + out_off + t * BN + rn, y)
        if LL:  # the value with its stage's epoch in one 8-byte word: a reader that sees the epoch sees the value
            bits = y.to(gl.float32).to(gl.int32, bitcast=True).to(gl.int64) & 0xFFFFFFFF
            gl.store(ll_ptr + out_off + t * BN + rn, bits | (epoch.to(gl.int64) << 32))
    return c, pl, pr, pt, pk, acc


@gluon.jit
def _chain2_kernel(x_ptr, buf_ptr, count_ptr, qkv_desc, o_desc, gu_desc, down_desc, max_spins, L, stamps_ptr, ll_ptr,
                   H: gl.constexpr, I: gl.constexpr, NQKV: gl.constexpr, G: gl.constexpr,
                   BN: gl.constexpr, BK: gl.constexpr, KB: gl.constexpr, NB: gl.constexpr, SYNC: gl.constexpr):
    pid = gl.program_id(0)
    num_warps: gl.constexpr = gl.num_warps()
    WL: gl.constexpr = gl.BlockedLayout([1, 1, 8], [1, 1, 32], [num_warps // KB, KB, 1], [2, 1, 0])
    XL: gl.constexpr = gl.BlockedLayout([1, 1, 4], [1, 1, 32], [1, num_warps, 1], [2, 1, 0])
    FL: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
    KSH: gl.constexpr = H // (KB * BK)
    KSI: gl.constexpr = I // (KB * BK)
    T_QKV: gl.constexpr = NQKV // G // BN
    T_H: gl.constexpr = H // G // BN
    T_GU: gl.constexpr = 2 * I // G // BN
    O_OFF: gl.constexpr = NQKV
    GU_OFF: gl.constexpr = NQKV + H
    D_OFF: gl.constexpr = NQKV + H + 2 * I
    total = L * (T_QKV * KSH + T_H * KSH + T_GU * KSH + T_H * KSI)

    ring = gl.allocate_shared_memory(gl.bfloat16, [NB, BN, KB, BK], qkv_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [NB, 1], mbarrier.MBarrierLayout())
    x_fill = gl.allocate_shared_memory(gl.bfloat16, [I // (KB * BK), KB, BK], gl.SwizzledSharedLayout(8, 1, 1, [2, 1, 0]))
    x_smem = x_fill._reinterpret(gl.bfloat16, [I // (KB * BK), KB, BK], gl.SwizzledSharedLayout(8, 1, 1, [1, 0]))
    for i in gl.static_range(NB):
        mbarrier.init(bars.index(i), count=1)
    pl = pid * 0
    pr = pid * 0
    pt = pid * 0
    pk = pid * 0
    for i in gl.static_range(NB - 1):
        _issue(pl, pr, pt, pk, i < total, i, bars, ring, qkv_desc, o_desc, gu_desc, down_desc, pid, BN, BK, KB, H, I,
               NQKV, G)
        pl, pr, pt, pk = _advance(pl, pr, pt, pk, H, I, NQKV, G, BN, BK, KB)
    c = pid * 0
    acc = gl.full([BN, KB, BK], 0.0, gl.float32, WL)
    base = gl.load(count_ptr + 2) * (4 * L)  # (the LL words' epochs: this launch's, past every earlier one's)
    LLM: gl.constexpr = SYNC == 2
    for layer in range(L):
        s = 4 * layer
        if layer == 0:
            _fill(x_fill, x_ptr, False, H, I, BK, KB, XL)
        else:
            _boundary(x_fill, buf_ptr + D_OFF, ll_ptr + D_OFF, count_ptr, stamps_ptr, s - 1, base, pid, max_spins,
                      SYNC, False, H, I, BK, KB, XL, G, FL)
        c, pl, pr, pt, pk, acc = _matrix(c, pl, pr, pt, pk, total, acc, bars, ring, x_smem, buf_ptr,
                                         pid * (NQKV // G), qkv_desc, o_desc, gu_desc, down_desc, pid, ll_ptr,
                                         base + s + 1, LLM, T_QKV, KSH, NB, BN, BK, KB, H, I, NQKV, G, WL)
        _boundary(x_fill, buf_ptr, ll_ptr, count_ptr, stamps_ptr, s, base, pid, max_spins,
                  SYNC, False, H, I, BK, KB, XL, G, FL)
        c, pl, pr, pt, pk, acc = _matrix(c, pl, pr, pt, pk, total, acc, bars, ring, x_smem, buf_ptr,
                                         O_OFF + pid * (H // G), qkv_desc, o_desc, gu_desc, down_desc, pid, ll_ptr,
                                         base + s + 2, LLM, T_H, KSH, NB, BN, BK, KB, H, I, NQKV, G, WL)
        _boundary(x_fill, buf_ptr + O_OFF, ll_ptr + O_OFF, count_ptr, stamps_ptr, s + 1, base, pid, max_spins,
                  SYNC, False, H, I, BK, KB, XL, G, FL)
        c, pl, pr, pt, pk, acc = _matrix(c, pl, pr, pt, pk, total, acc, bars, ring, x_smem, buf_ptr,
                                         GU_OFF + pid * (2 * I // G), qkv_desc, o_desc, gu_desc, down_desc, pid, ll_ptr,
                                         base + s + 3, LLM, T_GU, KSH, NB, BN, BK, KB, H, I, NQKV, G, WL)
        _boundary(x_fill, buf_ptr + GU_OFF, ll_ptr + GU_OFF, count_ptr, stamps_ptr, s + 2, base, pid, max_spins,
                  SYNC, True, I, I, BK, KB, XL, G, FL)
        c, pl, pr, pt, pk, acc = _matrix(c, pl, pr, pt, pk, total, acc, bars, ring, x_smem, buf_ptr,
                                         D_OFF + pid * (H // G), qkv_desc, o_desc, gu_desc, down_desc, pid, ll_ptr,
                                         base + s + 4, LLM, T_H, KSI, NB, BN, BK, KB, H, I, NQKV, G, WL)
    if SYNC == 1:
        _signal(count_ptr, 4 * L - 1, G, FL)
    for i in gl.static_range(NB):
        mbarrier.invalidate(bars.index(i))
    gl.thread_barrier()
    if gl.atomic_add(count_ptr + 1, 1, sem="acq_rel") == G - 1:
        gl.atomic_xchg(count_ptr, 0, sem="relaxed")
        gl.atomic_xchg(count_ptr + 1, 0, sem="relaxed")
        gl.atomic_add(count_ptr + 2, 1, sem="relaxed")
        f = gl.arange(0, G, layout=FL)
        gl.atomic_xchg(count_ptr + 64 + f, gl.full([G], 0, gl.int32, FL), sem="relaxed")
        f = gl.arange(0, G, layout=FL)
        gl.atomic_xchg(count_ptr + 32 + f * 32, gl.full([G], 0, gl.int32, FL), sem="relaxed")


def gluon_chain2(x, qkv_w, o_w, gu_w, down_w, programs=128, bn=8, bk=256, kb=4, stages=8, num_warps=8,
                 counter=None, sync=1, max_spins=1 << 20, descs=None, swizzle=0, stamps=None, ll=None):
    L, NQKV, H = qkv_w.shape
    I = down_w.shape[2]
    if counter is None:
        counter = torch.zeros(32 * (1 + programs), dtype=torch.int32, device=x.device)
    if descs is None:
        layout = gl.NVMMASharedLayout(swizzle_byte_width=swizzle, element_bitwidth=16, rank=3)
        descs = []
        for w in (qkv_w, o_w, gu_w, down_w):
            flat = w.reshape(-1, w.shape[-1] // bk, bk)
            descs.append(TensorDescriptor(flat, list(flat.shape), list(flat.stride()), [bn, kb, bk], layout))
    buf = torch.empty(NQKV + H + 2 * I + H, dtype=x.dtype, device=x.device)
    if stamps is None:
        stamps = torch.zeros(4 * L * 2 * programs, dtype=torch.int64, device=x.device)
    if ll is None:
        ll = torch.zeros(NQKV + H + 2 * I + H, dtype=torch.int64, device=x.device)
    _chain2_kernel[(programs,)](x, buf, counter, *descs, max_spins, L, stamps, ll, H=H, I=I, NQKV=NQKV, G=programs, BN=bn,
                                BK=bk, KB=kb, NB=stages, SYNC=int(sync), num_warps=num_warps)
    return buf[NQKV + H + 2 * I:]
