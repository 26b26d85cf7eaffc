"""The 16 layers' batch-1 gemvs as one persistent Gluon launch with a deep TMA stream (an
experiment, session 31; Hopper only: Gluon kernels do not run under Triton's interpreter).

Session 31's Triton persistent chain (commit 13cf3dd) lost because a count between two matrices
costs about 2 us, and a program's registers hold only two steps of weights, so the stream idles
while it waits. Here each program's weights come through a ring of NB shared-memory slots that TMA
fills asynchronously, NB - 1 steps ahead of the product, across matrices and layers: when a program
reaches a matrix's end and waits for the others, the next matrix's first NB - 1 steps are already
in flight, NB x 4 KB a program (128 KB at NB = 32).

The products are `persistent_chain`'s (13cf3dd): per layer qkv = W_qkv x, o = W_o qkv[:H],
gu = W_gu o, x = W_down (silu(gu[:I]) * gu[I:]); program p owns N / G rows of each matrix, streamed
as [BN, BK] boxes (BN rows by BK columns, K / BK boxes a row tile). Outputs go to one buffer
(q/k/v, o, gate/up, down regions). Between matrices: each program counts after its stores; the last
raises G flag lines; a program polls its own line, then fills its input row into shared memory
from L2. The weights of each role are stacked [L * N, K] and read through a tensor descriptor.
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

MAX_SPINS = 1 << 22


@gluon.jit
def _issue(p, total, bars, ring, qkv_desc, o_desc, gu_desc, down_desc, pid,
           NB: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, H: gl.constexpr, I: gl.constexpr,
           NQKV: gl.constexpr, G: gl.constexpr):
    """Ask TMA for the program's step p (if p < total) into slot p % NB."""
    S0: gl.constexpr = (NQKV // G // BN) * (H // BK)
    S1: gl.constexpr = (H // G // BN) * (H // BK)
    S2: gl.constexpr = (2 * I // G // BN) * (H // BK)
    S3: gl.constexpr = (H // G // BN) * (I // BK)
    T: gl.constexpr = S0 + S1 + S2 + S3
    if p < total:
        layer = p // T
        r = p % T
        slot = p % NB
        bar = bars.index(slot)
        dst = ring.index(slot)
        mbarrier.expect(bar, BN * BK * 2)
        if r < S0:
            row = layer * NQKV + pid * (NQKV // G) + (r // (H // BK)) * BN
            tma.async_copy_global_to_shared(qkv_desc, [row, (r % (H // BK)) * BK], bar, dst)
        elif r < S0 + S1:
            q = r - S0
            row = layer * H + pid * (H // G) + (q // (H // BK)) * BN
            tma.async_copy_global_to_shared(o_desc, [row, (q % (H // BK)) * BK], bar, dst)
        elif r < S0 + S1 + S2:
            q = r - S0 - S1
            row = layer * 2 * I + pid * (2 * I // G) + (q // (H // BK)) * BN
            tma.async_copy_global_to_shared(gu_desc, [row, (q % (H // BK)) * BK], bar, dst)
        else:
            q = r - S0 - S1 - S2
            row = layer * H + pid * (H // G) + (q // (I // BK)) * BN
            tma.async_copy_global_to_shared(down_desc, [row, (q % (I // BK)) * BK], bar, dst)


@gluon.jit
def _signal(count_ptr, stage, G: gl.constexpr, FL: gl.constexpr):
    gl.thread_barrier()  # every thread's stores issued before the count
    if gl.atomic_add(count_ptr, 1, sem="acq_rel") == (stage + 1) * G - 1:
        f = gl.arange(0, G, layout=FL)
        gl.atomic_xchg(count_ptr + 32 + f * 32, gl.full([G], 0, gl.int32, FL) + stage + 1, sem="release")


@gluon.jit
def _wait(count_ptr, stage, pid, max_spins):
    word = count_ptr + 32 + pid * 32
    seen = gl.load(word, volatile=True)
    spins = 0
    while (seen < stage) & (spins < max_spins):
        seen = gl.load(word, volatile=True)
        spins += 1
    gl.atomic_add(word, 0, sem="acquire")


@gluon.jit
def _fill(x_smem, src_ptr, GATED: gl.constexpr, K: gl.constexpr, I: gl.constexpr, BK: gl.constexpr,
          XL: gl.constexpr):
    """The matrix's input row into x_smem[: K // BK] (rows of BK), from L2."""
    cols = gl.arange(0, BK, layout=XL)
    gl.thread_barrier()  # every thread done with the previous matrix's row
    for j in gl.static_range(K // BK):
        if GATED:
            g = gl.load(src_ptr + j * BK + cols, cache_modifier=".cg").to(gl.float32)
            u = gl.load(src_ptr + I + j * BK + cols, cache_modifier=".cg").to(gl.float32)
            x = (g / (1.0 + gl.exp(-g)) * u).to(gl.bfloat16).to(gl.float32)  # (rounded as act_and_mul_gemv rounds)
        else:
            x = gl.load(src_ptr + j * BK + cols, cache_modifier=".cg").to(gl.float32)
        x_smem.index(j).store(x)
    gl.thread_barrier()


@gluon.jit
def _gluon_chain_kernel(x_ptr, buf_ptr, count_ptr, qkv_desc, o_desc, gu_desc, down_desc, max_spins,
                        L: gl.constexpr, H: gl.constexpr, I: gl.constexpr, NQKV: gl.constexpr, G: gl.constexpr,
                        BN: gl.constexpr, BK: gl.constexpr, NB: gl.constexpr, FENCE: gl.constexpr, XVEC: gl.constexpr,
                        SYNC: gl.constexpr, COMPUTE: gl.constexpr):
    pid = gl.program_id(0)
    num_warps: gl.constexpr = gl.num_warps()
    WL: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [num_warps, 1], [1, 0])  # a [BN, BK] box in registers
    XL: gl.constexpr = gl.SliceLayout(0, WL)
    FL: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
    S0: gl.constexpr = (NQKV // G // BN) * (H // BK)
    S1: gl.constexpr = (H // G // BN) * (H // BK)
    S2: gl.constexpr = (2 * I // G // BN) * (H // BK)
    S3: gl.constexpr = (H // G // BN) * (I // BK)
    T: gl.constexpr = S0 + S1 + S2 + S3
    O_OFF: gl.constexpr = NQKV  # the buffer's regions: q/k/v, o, gate/up, down
    GU_OFF: gl.constexpr = NQKV + H
    D_OFF: gl.constexpr = NQKV + H + 2 * I
    total = L * T

    ring = gl.allocate_shared_memory(gl.bfloat16, [NB, BN, BK], qkv_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [NB, 1], mbarrier.MBarrierLayout())
    x_smem = gl.allocate_shared_memory(gl.float32, [I // BK, BK], gl.SwizzledSharedLayout(XVEC, 1, 1, [0]))
    for i in gl.static_range(NB):
        mbarrier.init(bars.index(i), count=1)
    for i in gl.static_range(NB - 1):
        _issue(i, total, bars, ring, qkv_desc, o_desc, gu_desc, down_desc, pid, NB, BN, BK, H, I, NQKV, G)

    rn = gl.arange(0, BN, layout=gl.SliceLayout(1, WL))
    acc = gl.full([BN, BK], 0.0, gl.float32, WL)
    for c in range(total):
        layer = c // T
        r = c % T
        # the matrix's first step: count the last matrix, wait for every program's, fill the row
        if r == 0:
            if layer == 0:
                _fill(x_smem, x_ptr, False, H, I, BK, XL)
            else:
                if SYNC:
                    _signal(count_ptr, 4 * layer - 1, G, FL)
                    _wait(count_ptr, 4 * layer, pid, max_spins)
                _fill(x_smem, buf_ptr + D_OFF, False, H, I, BK, XL)
        elif r == S0:
            _signal(count_ptr, 4 * layer, G, FL)
            _wait(count_ptr, 4 * layer + 1, pid, max_spins)
            _fill(x_smem, buf_ptr, False, H, I, BK, XL)
        elif r == S0 + S1:
            if SYNC:
                _signal(count_ptr, 4 * layer + 1, G, FL)
                _wait(count_ptr, 4 * layer + 2, pid, max_spins)
            _fill(x_smem, buf_ptr + O_OFF, False, H, I, BK, XL)
        elif r == S0 + S1 + S2:
            if SYNC:
                _signal(count_ptr, 4 * layer + 2, G, FL)
                _wait(count_ptr, 4 * layer + 3, pid, max_spins)
            _fill(x_smem, buf_ptr + GU_OFF, True, I, I, BK, XL)
        # the step NB - 1 ahead goes into the slot step c - 1 used: every warp is done reading it
        gl.thread_barrier()
        if FENCE:
            fence_async_shared()
        _issue(c + NB - 1, total, bars, ring, qkv_desc, o_desc, gu_desc, down_desc, pid, NB, BN, BK, H, I, NQKV, G)
        slot = c % NB
        mbarrier.wait(bars.index(slot), (c // NB) & 1)
        if COMPUTE:
            w = ring.index(slot).load(WL).to(gl.float32)
        else:
            w = gl.full([BN, BK], 1.0, gl.float32, WL)
        # this step's role (0-3: q/k/v, o, gate/up, down): its K steps, first step, output rows
        in_o = (r >= S0).to(gl.int32)
        in_gu = (r >= S0 + S1).to(gl.int32)
        in_down = (r >= S0 + S1 + S2).to(gl.int32)
        ks = H // BK + in_down * (I // BK - H // BK)
        q = r - in_o * S0 - in_gu * S1 - in_down * S2
        out_off = (pid * (NQKV // G) + in_o * (O_OFF + pid * (H // G) - pid * (NQKV // G))
                   + in_gu * (GU_OFF + pid * (2 * I // G) - O_OFF - pid * (H // G))
                   + in_down * (D_OFF + pid * (H // G) - GU_OFF - pid * (2 * I // G)))
        kstep = q % ks
        x = x_smem.index(kstep).load(gl.SliceLayout(0, WL))
        prod = w * gl.expand_dims(x, 0)
        if kstep == 0:
            acc = prod
        else:
            acc = acc + prod
        if kstep == ks - 1:
            y = gl.sum(acc, axis=1)
            gl.store(buf_ptr + out_off + (q // ks) * BN + rn, y.to(gl.bfloat16))
    if SYNC:
        _signal(count_ptr, 4 * L - 1, G, FL)
    for i in gl.static_range(NB):
        mbarrier.invalidate(bars.index(i))
    # the last program to finish puts the count and the flags back to 0 for the next launch
    gl.thread_barrier()
    if gl.atomic_add(count_ptr + 1, 1, sem="acq_rel") == G - 1:
        gl.atomic_xchg(count_ptr, 0, sem="relaxed")
        gl.atomic_xchg(count_ptr + 1, 0, sem="relaxed")
        f = gl.arange(0, G, layout=FL)
        gl.atomic_xchg(count_ptr + 32 + f * 32, gl.full([G], 0, gl.int32, FL), sem="relaxed")


def counter_words(programs: int) -> int:
    return 32 * (1 + programs)


def descriptors(ws, bn: int, bk: int) -> list:
    layout = gl.NVMMASharedLayout.get_default_for([bn, bk], gl.bfloat16)
    out = []
    for w in ws:
        flat = w.reshape(-1, w.shape[-1])
        out.append(TensorDescriptor(flat, list(flat.shape), list(flat.stride()), [bn, bk], layout))
    return out


def gluon_chain(x: torch.Tensor, qkv_w, o_w, gu_w, down_w, programs: int = 128, bn: int = 8, bk: int = 256,
                stages: int = 32, num_warps: int = 8, counter: torch.Tensor | None = None, descs=None,
                max_spins: int = MAX_SPINS, fence: bool = True, xvec: int = 1, sync: bool = True,
                compute: bool = True) -> torch.Tensor:
    """The chain (module docstring) for one bf16 row x [H] -> the last layer's down output [H]."""
    L, NQKV, H = qkv_w.shape
    I = down_w.shape[2]
    for name, rows in (("q/k/v", NQKV), ("o", H), ("gate/up", 2 * I), ("down", H)):
        if rows % (programs * bn):
            raise ValueError(f"gluon chain: {name}'s {rows} rows do not split into {programs} programs of {bn}-row boxes")
    if counter is None:
        counter = torch.zeros(counter_words(programs), dtype=torch.int32, device=x.device)
    descs = descs or descriptors((qkv_w, o_w, gu_w, down_w), bn, bk)
    buf = torch.empty(NQKV + H + 2 * I + H, dtype=x.dtype, device=x.device)
    _gluon_chain_kernel[(programs,)](x, buf, counter, *descs, max_spins, L=L, H=H, I=I, NQKV=NQKV, G=programs,
                                     BN=bn, BK=bk, NB=stages, FENCE=fence, XVEC=xvec, SYNC=sync, COMPUTE=compute,
                                     num_warps=num_warps)
    return buf[NQKV + H + 2 * I:]


def reference(x: torch.Tensor, qkv_w, o_w, gu_w, down_w) -> torch.Tensor:
    """The chain in float32, each output rounded to x's dtype as the kernel stores it."""
    H, I = x.shape[0], down_w.shape[2]
    row = x.float()
    for layer in range(qkv_w.shape[0]):
        qkv = (qkv_w[layer].float() @ row).to(x.dtype).float()
        o = (o_w[layer].float() @ qkv[:H]).to(x.dtype).float()
        gu = (gu_w[layer].float() @ o).to(x.dtype).float()
        act = (torch.nn.functional.silu(gu[:I]) * gu[I:]).to(x.dtype).float()
        row = (down_w[layer].float() @ act).to(x.dtype).float()
    return row.to(x.dtype)
