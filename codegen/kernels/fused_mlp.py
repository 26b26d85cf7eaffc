"""A batch-1 gated MLP in one launch: the add + RMSNorm, gate/up, act(gate) * up and down, with no
launch boundary between the two products.

At batch 1 every linear is a weight stream, and each launch boundary costs the step 1-2.5 us on an
H100 (codegen/NOTES.md, sessions 27-33): a grid-wide dependency, since every program of the next
gemv needs the whole row the last one made. The boundary between gate/up and down need not be
grid-wide. Program p owns R rows of the intermediate (TILES groups of R, streamed one after the
other): their gate and up rows, and the same rows of down's transpose (down's columns, stored as
contiguous rows). It makes its values of act(gate) * up itself, multiplies them into all H outputs
of down, a partial sum over its rows, and adds that to float32 partial sums with atomics. Nothing
waits on another program.

The output is those partial sums: `copies` float32 rows (program p adds into row p % copies) whose
sum is the MLP's output before its rounding. Several rows because hundreds of programs adding into
the same 64 cache lines queue at them (with whole rows a program sums its row groups' shares
first, one add a column); two rows were the best once the reader's cost (below) counts.
The reader is the next gemv's add + RMSNorm prologue (`quant_gemm.rms_norm_gemv(partials=True)`),
which reads every row of it in every program.

The rows must be zero when the launch starts. A layer's rows are `Accumulators`' slot `slot`; the
launch zeroes slot `slot - 1`'s (mod the slots): the layer before's, which this layer's q/k/v gemv
has read by then. So across a forward every slot is zeroed once between its reader and its next
writer, as long as each forward runs all slots in order (a forward that stops half way leaves
slots unzeroed: `Accumulators.reset`).

The atomics sum in an order that varies from run to run: the float32 sums may differ in their last
bits, and so (rarely) their rounding to the model's dtype.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kiln.codegen.kernels.activation import ACTIVATIONS, act_and_mul
from kiln.codegen.kernels.pdl import launch_args, wait_for_inputs
from kiln.codegen.kernels.quant_gemm import _dequant
from kiln.ir.ops import MLP_PARTIALS

# The launch's shape, measured on an H100 as chains of 16 layers with the q/k/v gemv that reads the
# sums (`benchmarks/mlp_chain.py`, Llama-3.2-1B, session 33): 8 rows x 2 tiles a program, whole rows
# a step, 8 warps, one step ahead, two rows of sums: 41.6 us a layer against the engine's 43.3
# (gate/up gemv, then down gemv). Four rows of sums: 43.5; one: 42.7. Other shapes: RESULTS.
ROWS, TILES, MAX_BLOCK, NUM_WARPS, DEPTH = 8, 2, 2048, 8, 1
COPIES = MLP_PARTIALS  # (the op's output holds them: ir/ops.py)
# 8-bit weight-only MLPs as one launch too (int8 or e4m3 rows, their per-channel scales applied to the
# sums): off, since it loses on an H100. Session 34, at this module's tiling: the 1B step 1.226 / 1.208
# ms/token in int8 / fp8 against 0.742 / 0.768 with the two gemvs. Session 35 found most of that: at 8
# warps an 8-bit [8, 2048] tile (16 bytes a thread) lies over 2 x 4 warps, so down's sum over a program's
# rows crosses warps through shared memory (30 barriers against bf16's 16; bf16's 8 x 2048 lies over
# 1 x 8 warps, each thread holding all 8 rows). At 4 warps the rows stay in a thread: 8 rows x 2 tiles
# 0.889 (int8), 0.786 (fp8); 4 rows x 2 tiles 0.789 / 0.775 against 0.741 / 0.763. Fewer rows a
# program (2, or 4 x 1 tile) lose again: more programs, each adding a whole row of sums with atomics.
# What is left is likely the work a weight byte costs (int8: sign extension, add, subtract, multiply-add;
# bf16 does one multiply-add a 2 bytes). The fuse_mlp pass leaves 8-bit MLPs alone without it:
# KILN_FUSED_MLP_8BIT=1, `bash benchmarks/gpu_session.sh mlp-8bit`.
EIGHT_BIT = os.environ.get("KILN_FUSED_MLP_8BIT", "0") == "1"


@triton.jit
def _mlp_step(wgu_ptr, wdt_ptr, pid, i, H, I, R: tl.constexpr, BLOCK: tl.constexpr, KS: tl.constexpr,
              TILES: tl.constexpr):
    """The weights of step i of program pid's stream: for each of its TILES row groups, KS steps
    of its gate and up rows' columns, then KS steps of its rows of down's transpose (returned twice,
    to keep the pair's shape)."""
    rows = (pid * TILES + i // (2 * KS)) * R + tl.arange(0, R)
    j = i % (2 * KS)
    cols = (j % KS) * BLOCK + tl.arange(0, BLOCK)
    if j < KS:
        ptrs = wgu_ptr + rows[:, None].to(tl.int64) * H + cols[None, :]
        a = tl.load(ptrs)
        b = tl.load(ptrs + I.to(tl.int64) * H)
    else:
        a = tl.load(wdt_ptr + rows[:, None].to(tl.int64) * H + cols[None, :])
        b = a
    return a, b


@triton.jit
def _mlp_gemv_kernel(x_ptr, res_ptr, g_ptr, sum_ptr, wgu_ptr, wdt_ptr, gus_ptr, ds_ptr, acc_ptr, zero_ptr, H, I,
                     eps, R: tl.constexpr, BLOCK: tl.constexpr, KS: tl.constexpr, TILES: tl.constexpr,
                     DEPTH: tl.constexpr, COPIES: tl.constexpr, ACT: tl.constexpr, W8: tl.constexpr,
                     EARLY_W: tl.constexpr, PDL: tl.constexpr):
    """Program pid: intermediate rows pid * TILES * R + [0, TILES * R). x, res, g [H] (the norm
    weight); wgu [2I, H] (gate rows, then up rows), wdt [I, H] (down transposed); acc [COPIES, H]
    float32 += down's partial product (program pid into row pid % COPIES); zero [COPIES, H] float32
    set to 0 and sum [H] to x + res by program 0. W8 (1 int8, 2 e4m3; 0 float weights): the weights
    are 8-bit with per-channel scales, gus [2I] gate/up's by row and ds [H] down's by output (each
    program's partial sums scaled by it). H = KS * BLOCK; I a multiple of TILES * R. The
    program's weights are one stream of TILES * 2 * KS steps, unrolled, step i + DEPTH loaded
    before step i's product (the first DEPTH before the PDL wait with EARLY_W)."""
    pid = tl.program_id(0)
    STEPS: tl.constexpr = TILES * 2 * KS
    rk = tl.arange(0, BLOCK)
    if not EARLY_W:
        wait_for_inputs(PDL)
    a0, b0 = _mlp_step(wgu_ptr, wdt_ptr, pid, 0, H, I, R, BLOCK, KS, TILES)
    a1, b1 = a0, b0
    if DEPTH == 2:
        a1, b1 = _mlp_step(wgu_ptr, wdt_ptr, pid, 1, H, I, R, BLOCK, KS, TILES)
    if EARLY_W:
        wait_for_inputs(PDL)
    dtype = g_ptr.dtype.element_ty
    if pid == 0:
        for k in range(0, COPIES * H, BLOCK):
            tl.store(zero_ptr + k + rk, tl.zeros((BLOCK,), tl.float32))
        for k in range(0, H, BLOCK):
            s = tl.load(x_ptr + k + rk).to(tl.float32) + tl.load(res_ptr + k + rk).to(tl.float32)
            tl.store(sum_ptr + k + rk, s.to(dtype))
    # The norm's statistics are gathered as the first row group streams (the product is linear in
    # the row, so the row's rstd scales the sums at the end), as the gemv's NORM_AT_END does. With
    # one step a row (KS == 1) the scaled row is made once a program. (Names a later unrolled step
    # reads are bound before the loop: Triton drops those first bound inside it.)
    gate = tl.zeros((R,), tl.float32)
    up = tl.zeros((R,), tl.float32)
    h = tl.zeros((R,), tl.float32)
    squares = 0.0
    rstd = 0.0
    xs_kept = tl.zeros((BLOCK,), tl.float32)
    down_sum = tl.zeros((BLOCK,), tl.float32)
    for i in tl.static_range(STEPS):
        wa, wb = a0, b0
        if DEPTH == 2:
            a0, b0 = a1, b1
        if i + DEPTH < STEPS:
            an, bn = _mlp_step(wgu_ptr, wdt_ptr, pid, i + DEPTH, H, I, R, BLOCK, KS, TILES)
            if DEPTH == 2:
                a1, b1 = an, bn
            else:
                a0, b0 = an, bn
        j = i % (2 * KS)
        if j < KS:
            if KS == 1 and i > 0:
                xs = xs_kept
            else:
                s = (tl.load(x_ptr + j * BLOCK + rk).to(tl.float32)
                     + tl.load(res_ptr + j * BLOCK + rk).to(tl.float32)).to(dtype).to(tl.float32)
                if i < KS:
                    squares += tl.sum(s * s, axis=0)
                xs = tl.load(g_ptr + j * BLOCK + rk).to(tl.float32) * s
                xs_kept = xs
            if j == 0:
                gate = tl.zeros((R,), tl.float32)
                up = tl.zeros((R,), tl.float32)
            gate += tl.sum(_dequant(wa, tl.float32, W8 == 1) * xs[None, :], axis=1)
            up += tl.sum(_dequant(wb, tl.float32, W8 == 1) * xs[None, :], axis=1)
            if j == KS - 1:
                if i == KS - 1:
                    rstd = tl.rsqrt(squares / H + eps)
                if W8 != 0:
                    rows = (pid * TILES + i // (2 * KS)) * R + tl.arange(0, R)
                    gate = gate * tl.load(gus_ptr + rows)
                    up = up * tl.load(gus_ptr + I + rows)
                # gate/up rounded to the model's dtype, as the reference's linear rounds them
                h = act_and_mul((gate * rstd).to(dtype), (up * rstd).to(dtype), ACT).to(tl.float32)
        else:
            part = tl.sum(_dequant(wa, tl.float32, W8 == 1) * h[:, None], axis=0)
            cols = (j - KS) * BLOCK + rk
            if KS == 1:  # whole rows: the program's tiles summed first, one add a column a program
                down_sum += part
                if i == STEPS - 1:
                    if W8 != 0:
                        down_sum = down_sum * tl.load(ds_ptr + cols)
                    tl.atomic_add(acc_ptr + (pid % COPIES) * H + cols, down_sum, sem="relaxed")
            else:
                if W8 != 0:
                    part = part * tl.load(ds_ptr + cols)
                tl.atomic_add(acc_ptr + (pid % COPIES) * H + cols, part, sem="relaxed")


_W8 = {torch.int8: 1, torch.float8_e4m3fn: 2}


def block_for(hidden: int) -> int | None:
    """The launch's step along a row of `hidden` (whole rows up to MAX_BLOCK), or None when the
    kernel does not take that width (a power of two, or a multiple of MAX_BLOCK)."""
    if hidden <= MAX_BLOCK:
        return hidden if hidden >= 16 and hidden & (hidden - 1) == 0 else None
    return MAX_BLOCK if hidden % MAX_BLOCK == 0 else None


def takes(hidden: int, intermediate: int) -> bool:
    """Whether mlp_gemv takes an MLP of these widths with its default tiling."""
    return block_for(hidden) is not None and intermediate % (ROWS * TILES) == 0


def mlp_gemv(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
             w_gate_up: torch.Tensor, w_down_t: torch.Tensor, acc: torch.Tensor, zero: torch.Tensor,
             activation: str = "silu", rows: int | None = None, tiles: int | None = None,
             num_warps: int | None = None, depth: int | None = None, static_weight: bool = True,
             gate_up_scale: torch.Tensor | None = None, down_scale: torch.Tensor | None = None) -> torch.Tensor:
    """acc += down(act(gate) * up) of rms_norm(x + residual) for one row, as float32 partial sums
    (their sum is the output, see the module's note); zero[:] = 0; returns x + residual.
    x, residual, norm_weight [H] (one float dtype; the weights share it, or are 8-bit with their
    per-channel scales: gate_up_scale [2I], down_scale [H], as weight_only_linear's); w_gate_up [2I, H]
    (gate rows, then up rows); w_down_t [I, H] (down's weight transposed); acc, zero [C, H] float32,
    acc zero on entry. The tiling defaults to the module's (ROWS, TILES, NUM_WARPS, DEPTH, read per call
    so that a benchmark may set them). static_weight: the weights are parameters, not made by the
    forward (pdl.py)."""
    rows, tiles, num_warps, depth = rows or ROWS, tiles or TILES, num_warps or NUM_WARPS, depth or DEPTH
    H, I = norm_weight.shape[-1], w_down_t.shape[0]
    block = block_for(H)
    if w_gate_up.shape != (2 * I, H) or w_down_t.shape != (I, H) or x.numel() != H or residual.numel() != H:
        raise ValueError(f"mlp_gemv: x of {x.numel()} values, gate/up {tuple(w_gate_up.shape)} and down transposed "
                         f"{tuple(w_down_t.shape)} do not make a gated MLP of one row of width {H}")
    if block is None or I % (rows * tiles):
        raise ValueError(f"mlp_gemv: width {H} (a power of two or a multiple of {MAX_BLOCK}) and intermediate {I} "
                         f"(a multiple of {rows * tiles}) do not fit the launch")
    if activation not in ACTIVATIONS:
        raise ValueError(f"mlp_gemv: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    eight_bit = gate_up_scale is not None or down_scale is not None
    dtypes = {t.dtype for t in (x, residual, norm_weight) + (() if eight_bit else (w_gate_up, w_down_t))}
    if len(dtypes) != 1 or norm_weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"mlp_gemv: x, residual, the norm weight and float weights must share a float dtype, got "
                        f"{sorted(str(d) for d in dtypes)}")
    w8 = _W8.get(w_gate_up.dtype, 0) if eight_bit else 0
    if eight_bit and (w8 == 0 or w_down_t.dtype != w_gate_up.dtype or gate_up_scale is None or down_scale is None
                      or gate_up_scale.numel() != 2 * I or down_scale.numel() != H):
        raise TypeError(f"mlp_gemv: 8-bit weights are int8 or float8_e4m3fn, both alike, with a scale for each of "
                        f"gate/up's {2 * I} rows and down's {H} outputs; got {w_gate_up.dtype} and {w_down_t.dtype}")
    for name, t in (("acc", acc), ("zero", zero)):
        if t.dtype != torch.float32 or t.dim() != 2 or t.shape[1] != H or not t.is_contiguous():
            raise ValueError(f"mlp_gemv: {name} must be contiguous float32 rows of {H}, got {t.dtype} {tuple(t.shape)}")
    if acc.shape != zero.shape or acc.data_ptr() == zero.data_ptr():
        raise ValueError("mlp_gemv: acc and zero must be two buffers of one shape")
    if not (w_gate_up.is_contiguous() and w_down_t.is_contiguous()):
        raise ValueError("mlp_gemv: the weights must be contiguous")
    summed = torch.empty_like(residual)
    pdl = launch_args(x.device)
    early_w = static_weight and pdl["PDL"] and torch.cuda.is_current_stream_capturing()
    gus = gate_up_scale.reshape(-1).float().contiguous() if eight_bit else acc
    ds = down_scale.reshape(-1).float().contiguous() if eight_bit else acc
    _mlp_gemv_kernel[(I // (rows * tiles),)](
        x, residual, norm_weight, summed, w_gate_up, w_down_t, gus, ds, acc, zero, H, I, float(eps), R=rows,
        BLOCK=block, KS=H // block, TILES=tiles, DEPTH=depth, COPIES=acc.shape[0], ACT=ACTIVATIONS[activation], W8=w8,
        EARLY_W=early_w, num_warps=num_warps, num_stages=1, **pdl)
    return summed


class Accumulators:
    """The partial sums of a forward's fused MLPs: [slots, COPIES, H] float32, zero when made.
    Slot s is the s-th fused MLP's output; its launch zeroes slot s - 1 (see the module's note)."""

    def __init__(self, slots: int, hidden: int, device: torch.device):
        if slots < 2:
            raise ValueError(f"fused MLPs need at least two slots (each zeroes the one before), got {slots}")
        self.sums = torch.zeros(slots, COPIES, hidden, dtype=torch.float32, device=device)

    def pair(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(slot's rows, to add into; the slot before's, to zero)."""
        return self.sums[slot], self.sums[(slot - 1) % self.sums.shape[0]]

    def reset(self) -> None:
        self.sums.zero_()


_accumulators: dict[tuple, Accumulators] = {}


def accumulators(slots: int, hidden: int, device: torch.device) -> Accumulators:
    """One Accumulators per (slots, width, device): a model's forwards run one after another on a
    stream, and each leaves the invariant as it found it, so models of one shape can share them."""
    key = (slots, hidden, device)
    if key not in _accumulators:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():  # (they must outlive the graph)
            raise RuntimeError("fused MLP partial sums made while a CUDA graph captures: run the forward once first")
        _accumulators[key] = Accumulators(slots, hidden, device)
    return _accumulators[key]


def reset_all() -> None:
    """Zero every Accumulators (after a forward that did not finish)."""
    for acc in _accumulators.values():
        acc.reset()
