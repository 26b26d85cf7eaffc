"""The batch-1 gemvs of a stack of decoder layers as one persistent launch (an experiment, session 31).

A batch-1 step is a chain of launches, and each boundary costs about 2-2.5 us on an H100 beyond
its weight bytes (codegen/NOTES.md, sessions 26-30): the next gemv's programs become resident only
as the previous kernel's leave, and its weight stream ramps up again. This kernel asks what the
same gemvs cost when they are one launch: G programs, all resident at once, each streaming its own
rows of every matrix in turn, and between two matrices a count instead of a kernel boundary.

Per layer, four products of one row, the matrices stacked [L, N, K]:

    qkv = W_qkv @ x          (x: the input row for layer 0, then the previous layer's down output)
    o   = W_o @ qkv[:H]      (standing in for the attention's output)
    gu  = W_gu @ o
    d   = W_down @ (silu(gu[:I]) * gu[I:])

Program p owns rows [p * N / G, (p + 1) * N / G) of every matrix, streamed as steps of whole rows
(TILE_ROWS rows of K = H, or TILE_ROWS * H / I rows of down's K = I: every step is the same bytes).
Step i + 2's weights are loaded before step i's product, across matrices and across layers: at
the end of a matrix the program already has the next matrix's first two steps in flight. Then it
waits, counting: after its last store of a matrix each program adds 1 to one counter (a barrier,
then a release); a program that starts matrix s (the s-th of the launch) waits until the counter
reaches s * G (volatile polls, then one acquire), which says every program has stored its rows of
matrix s - 1. It then reads its input row from L2 (`.cg`: an SM's L1 may hold the row's previous
layer). The last program to finish puts the counter back to 0 for the next launch.

Every program must be resident for the counts to complete: the launcher refuses a G above what the
compiled kernel's registers allow on the device's SMs, and a poll gives up after `max_spins` (the
launch then fails, on a GPU, rather than hanging). Triton's interpreter runs programs one after
another, so there the kernel runs with G = 1 only (`interpreted_programs`).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .two_rank_all_reduce import _trap

MAX_SPINS = 1 << 22  # polls of the counter before a program gives up (seconds on a GPU)


@triton.jit
def _wait_stage(count_ptr, stage, pid, max_spins, G: tl.constexpr, FLAGS: tl.constexpr, TRAP: tl.constexpr,
                SYNC: tl.constexpr):
    """Wait until the launch's first `stage` matrices are done: with FLAGS == 0, until the count
    reaches stage * G; else until this program's flag (one of FLAGS, a line each) reaches stage.
    Volatile polls, then an acquire (what the stores it stands for made visible to this program's
    later loads). SYNC=False (benchmarks only: the outputs are then wrong) does not wait, to time
    the weight stream alone."""
    if SYNC:
        if FLAGS == 0:
            word = count_ptr
            target = stage * G
        else:
            word = count_ptr + 32 + (pid % FLAGS) * 32
            target = stage
        seen = tl.load(word, volatile=True)
        spins = 0
        while (seen < target) & (spins < max_spins):
            seen = tl.load(word, volatile=True)
            spins += 1
        seen = tl.atomic_add(word, 0, sem="acquire")
        if TRAP:
            if seen < target:
                _trap(seen)


@triton.jit
def _signal(count_ptr, stage, G: tl.constexpr, FLAGS: tl.constexpr):
    """This program has stored its rows of matrix `stage`: count it. With FLAGS, the last program to
    count raises every flag to stage + 1, so that the others poll FLAGS lines, not one."""
    tl.debug_barrier()  # every thread's stores issued before the count's release
    if FLAGS == 0:
        tl.atomic_add(count_ptr, 1, sem="release")
    else:
        if tl.atomic_add(count_ptr, 1, sem="acq_rel") == (stage + 1) * G - 1:
            f = tl.arange(0, FLAGS)
            tl.atomic_xchg(count_ptr + 32 + f * 32, tl.zeros([FLAGS], tl.int32) + stage + 1, sem="release")


@triton.jit
def _tile(w_ptr, row0, ROWS: tl.constexpr, K: tl.constexpr):
    """ROWS whole rows of a [N, K] matrix from row0."""
    rows = row0 + tl.arange(0, ROWS)
    return tl.load(w_ptr + rows[:, None].to(tl.int64) * K + tl.arange(0, K)[None, :])


@triton.jit
def _stream(w_a, w_b, x, w_ptr, out_ptr, pid, next_ptr, next_pid_row0,
            ROWS: tl.constexpr, K: tl.constexpr, STEPS: tl.constexpr,
            NEXT_ROWS: tl.constexpr, NEXT_K: tl.constexpr):
    """Stream one matrix's steps for program pid: w_a and w_b hold steps 0 and 1 on entry and the
    next matrix's steps 0 and 1 on return (its rows from next_pid_row0, next_ptr's tiles)."""
    for i in tl.static_range(STEPS):
        w = w_a
        if i + 2 < STEPS:
            w_next = _tile(w_ptr, pid * STEPS * ROWS + (i + 2) * ROWS, ROWS, K)
        else:
            w_next = _tile(next_ptr, next_pid_row0 + (i + 2 - STEPS) * NEXT_ROWS, NEXT_ROWS, NEXT_K)
        w_a = w_b
        w_b = w_next
        y = tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        tl.store(out_ptr + pid * STEPS * ROWS + i * ROWS + tl.arange(0, ROWS), y.to(out_ptr.dtype.element_ty))
    return w_a, w_b


@triton.jit
def _chain_kernel(x_ptr, qkv_w, o_w, gu_w, down_w, qkv_out, o_out, gu_out, down_out, count_ptr, max_spins,
                  L: tl.constexpr, H: tl.constexpr, I: tl.constexpr, NQKV: tl.constexpr, G: tl.constexpr,
                  TILE_ROWS: tl.constexpr, FLAGS: tl.constexpr, TRAP: tl.constexpr, SYNC: tl.constexpr):
    pid = tl.program_id(0)
    DOWN_ROWS: tl.constexpr = TILE_ROWS * H // I
    S_QKV: tl.constexpr = NQKV // G // TILE_ROWS
    S_O: tl.constexpr = H // G // TILE_ROWS
    S_GU: tl.constexpr = 2 * I // G // TILE_ROWS
    S_DOWN: tl.constexpr = H // G // DOWN_ROWS
    rh = tl.arange(0, H)
    ri = tl.arange(0, I)
    w_a = _tile(qkv_w, pid * S_QKV * TILE_ROWS, TILE_ROWS, H)
    w_b = _tile(qkv_w, pid * S_QKV * TILE_ROWS + TILE_ROWS, TILE_ROWS, H)
    for layer in range(L):
        s = 4 * layer  # the launch's matrices before this layer's q/k/v
        qkv_l = qkv_w + layer * NQKV * H
        o_l = o_w + layer * H * H
        gu_l = gu_w + layer * 2 * I * H
        down_l = down_w + layer * H * I
        if layer == 0:
            x = tl.load(x_ptr + rh).to(tl.float32)
        else:
            _wait_stage(count_ptr, s, pid, max_spins, G, FLAGS, TRAP, SYNC)
            x = tl.load(down_out + rh, cache_modifier=".cg").to(tl.float32)
        w_a, w_b = _stream(w_a, w_b, x, qkv_l, qkv_out, pid, o_l, pid * S_O * TILE_ROWS,
                           TILE_ROWS, H, S_QKV, TILE_ROWS, H)
        _signal(count_ptr, s, G, FLAGS)
        _wait_stage(count_ptr, s + 1, pid, max_spins, G, FLAGS, TRAP, SYNC)
        x = tl.load(qkv_out + rh, cache_modifier=".cg").to(tl.float32)
        w_a, w_b = _stream(w_a, w_b, x, o_l, o_out, pid, gu_l, pid * S_GU * TILE_ROWS,
                           TILE_ROWS, H, S_O, TILE_ROWS, H)
        _signal(count_ptr, s + 1, G, FLAGS)
        _wait_stage(count_ptr, s + 2, pid, max_spins, G, FLAGS, TRAP, SYNC)
        x = tl.load(o_out + rh, cache_modifier=".cg").to(tl.float32)
        w_a, w_b = _stream(w_a, w_b, x, gu_l, gu_out, pid, down_l, pid * S_DOWN * DOWN_ROWS,
                           TILE_ROWS, H, S_GU, DOWN_ROWS, I)
        _signal(count_ptr, s + 2, G, FLAGS)
        _wait_stage(count_ptr, s + 3, pid, max_spins, G, FLAGS, TRAP, SYNC)
        gate = tl.load(gu_out + ri, cache_modifier=".cg").to(tl.float32)
        up = tl.load(gu_out + I + ri, cache_modifier=".cg").to(tl.float32)
        # (rounded to the row's dtype, as act_and_mul_gemv's row is)
        x = (gate * tl.sigmoid(gate) * up).to(down_out.dtype.element_ty).to(tl.float32)
        next_qkv = qkv_w + tl.minimum(layer + 1, L - 1) * NQKV * H  # (the last layer reloads its own: unused)
        w_a, w_b = _stream(w_a, w_b, x, down_l, down_out, pid, next_qkv, pid * S_QKV * TILE_ROWS,
                           DOWN_ROWS, I, S_DOWN, TILE_ROWS, H)
        _signal(count_ptr, s + 3, G, FLAGS)
    # the last program to arrive (every program past its last wait) resets the counter
    tl.debug_barrier()
    if tl.atomic_add(count_ptr + 1, 1, sem="acq_rel") == G - 1:
        tl.atomic_xchg(count_ptr, 0, sem="relaxed")
        tl.atomic_xchg(count_ptr + 1, 0, sem="relaxed")
        if FLAGS > 0:
            f = tl.arange(0, FLAGS)
            tl.atomic_xchg(count_ptr + 32 + f * 32, tl.zeros([FLAGS], tl.int32), sem="relaxed")


def counter_words(flags: int) -> int:
    """The count, the programs done, then a 128-byte line a flag."""
    return 32 * (1 + flags)


def interpreted_programs() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_layout(H: int, I: int, NQKV: int, G: int, tile_rows: int) -> None:
    """Every program streams whole steps of every matrix, at least two of each."""
    down_rows = tile_rows * H // I
    if down_rows < 1 or tile_rows * H % I:
        raise ValueError(f"persistent chain: down's steps of {tile_rows} x {H} weights are not whole rows of {I}")
    for name, rows, step in (("q/k/v", NQKV, tile_rows), ("o", H, tile_rows), ("gate/up", 2 * I, tile_rows),
                             ("down", H, down_rows)):
        if rows % (G * step) or rows // (G * step) < 2:
            raise ValueError(f"persistent chain: {name}'s {rows} rows do not split into at least two steps of "
                             f"{step} rows for each of {G} programs (H {H}, I {I}, {tile_rows} rows a step)")


def resident_programs(kernel, num_warps: int, device: torch.device) -> int:
    """How many programs of a compiled kernel the device holds at once (registers and threads)."""
    props = torch.cuda.get_device_properties(device)
    per_thread = max(kernel.n_regs, 1)
    by_regs = props.regs_per_multiprocessor // (per_thread * 32 * num_warps)
    by_threads = props.max_threads_per_multi_processor // (32 * num_warps)
    return props.multi_processor_count * min(by_regs, by_threads, 32)


def chain_gemvs(x: torch.Tensor, qkv_w: torch.Tensor, o_w: torch.Tensor, gu_w: torch.Tensor, down_w: torch.Tensor,
                programs: int, tile_rows: int = 4, num_warps: int = 8, maxnreg: int | None = None,
                flags: int = 0, counter: torch.Tensor | None = None, max_spins: int = MAX_SPINS,
                sync: bool = True) -> torch.Tensor:
    """The layers' gemvs (module docstring) for one row x [H] -> the last layer's down output [H].
    Weights stacked [L, N, K] in x's dtype. flags: 0 (every program polls the count) or a power of
    two (`_signal`). counter: `counter_words(flags)` int32 zeros (kept zero between launches).
    maxnreg: a cap on the registers a thread (uncapped, the unrolled streams hoist their loads
    to 255 registers; two programs of 8 warps an SM need 128)."""
    L, NQKV, H = qkv_w.shape
    I = down_w.shape[2]
    check_layout(H, I, NQKV, programs, tile_rows)
    if interpreted_programs() and programs != 1:
        raise ValueError("persistent chain: the interpreter runs programs in turn, so only one program")
    if counter is None:
        counter = torch.zeros(counter_words(flags), dtype=torch.int32, device=x.device)
    if counter.numel() < counter_words(flags):
        raise ValueError(f"persistent chain: {flags} flags need a counter of {counter_words(flags)} words")
    outs = [torch.empty(n, dtype=x.dtype, device=x.device) for n in (NQKV, H, 2 * I, H)]
    args = (x, qkv_w, o_w, gu_w, down_w, *outs, counter, max_spins)
    meta = dict(L=L, H=H, I=I, NQKV=NQKV, G=programs, TILE_ROWS=tile_rows, FLAGS=flags, TRAP=not interpreted_programs(), SYNC=sync,
                num_warps=num_warps, **({"maxnreg": maxnreg} if maxnreg and x.device.type == "cuda" else {}))
    if x.device.type == "cuda":
        kernel = _chain_kernel.warmup(*args, grid=(programs,), **meta)
        kernel._init_handles()
        if programs > resident_programs(kernel, num_warps, x.device):
            raise ValueError(f"persistent chain: {programs} programs of {kernel.n_regs} registers x {num_warps} warps "
                             f"are more than the device holds at once")
    _chain_kernel[(programs,)](*args, **meta)
    return outs[3]


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
