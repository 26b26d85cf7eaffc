"""What the decode attention costs between its neighbours: a chain of layers in one CUDA graph.

The batch-1 profile of the Llama-3.2-1B step has the attention adding about 6 us a layer (97 us of a
1.02 ms step on an H100) for almost no bytes. This rebuilds the part of the step around it with the
step's own kernels and PDL, so the attention's share can be taken apart and its variants timed in
seconds instead of whole engines:

    each layer: q/k/v gemv (`rope_gemv`: norm prologue, rotary and the cache write in its epilogue)
                -> attention row (below) -> o gemv (`float_linear`), whose output is the next layer's input

every layer with its own weights and caches (so no weight is in L2 when its gemv reads it), the
context `--context` keys long in block tables `--capacity` keys wide (a decode graph is captured
for the longest context, and the split count follows that). Rows:

- `none`: no attention; the o gemv reads the q columns (the floor: two gemvs a layer);
- `empty`: one program that waits for its predecessor and lets the next launch (a kernel boundary);
  `empty (launch first)` lets the next launch before its wait (what the boundary costs is mostly
  that launch after the wait: 0.26 against 2.01 us a layer on an H100, session 27);
- `copy`: a program per kv head that waits, loads its heads' q and stores them as the output (a
  boundary and one dependent load);
- `default`: `decode_attention` as the step calls it; then its variants (splits, tiles, warps,
  the merge kernel, no early kv loads, this step's token as one row or a tile).

Each row: us a layer (the graph's median replay / layers) and what the attention adds over `none`.
Rows are timed in rounds, interleaved, as `decode_latency.py --rounds` does. Without CUDA,
`--smoke` runs every row once on tiny shapes (TRITON_INTERPRET=1) and checks `default` against
the merge kernel's form.

    python benchmarks/attention_chain.py [--shape llama-1b|llama-8b-tp2] [--context 256] [--rows default,splits 8]
    TRITON_INTERPRET=1 python benchmarks/attention_chain.py --smoke
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import statistics
import sys
from unittest import mock

import torch
import triton
import triton.language as tl

from kiln.codegen.kernels.decode_attention import decode_attention
from kiln.codegen.kernels.pdl import launch_args, wait_for_inputs
from kiln.codegen.kernels.quant_gemm import NEOX, Rope, float_linear, rope_gemv

# (the package's `decode_attention` is the function; its module holds the switches)
attention_module = importlib.import_module("kiln.codegen.kernels.decode_attention")

# (hidden, q heads, kv heads, head dim, layers, the tables' width in keys) of one rank
SHAPES = {"llama-1b": (2048, 32, 8, 64, 16, 1024), "llama-8b-tp2": (4096, 16, 4, 128, 32, 2048),
          "smoke": (128, 4, 2, 32, 2, 64)}
BLOCK_SIZE = 16

# the rows with no attention in them
BOUNDARY_ROWS = ("none", "empty", "empty (launch first)", "copy")

# name -> (decode_attention keyword arguments, decode_attention module switches)
ATTENTION_ROWS = {
    "default": ({}, {}),
    "merge kernel": ({"merge_in_kernel": False}, {}),
    "no early kv": ({"early_kv": False}, {}),
    "newest as row": ({}, {"NEWEST_ROW": True}),
    "newest as tile": ({}, {"NEWEST_ROW": False}),
    **{f"splits {n}": ({"num_splits": n}, {}) for n in (1, 2, 4, 8, 16, 32)},
    "splits 1 (tile 512 / 16 warps)": ({"num_splits": 1, "block_n": 512, "num_warps": 16}, {}),
    "warps 2": ({"num_warps": 2}, {}),
    "warps 8": ({"num_warps": 8}, {}),
}


@triton.jit
def _empty_kernel(PDL: tl.constexpr, FIRST: tl.constexpr):
    """FIRST: the next kernel let launch before the wait (as well as after: a second call is a no-op)."""
    if FIRST and PDL:
        tl.extra.cuda.gdc_launch_dependents()
    wait_for_inputs(PDL)


@triton.jit
def _copy_q_kernel(q_ptr, out_ptr, HEADS: tl.constexpr, D: tl.constexpr, PDL: tl.constexpr):
    """A kv head's program: its query heads' rows of q -> out, after the wait."""
    wait_for_inputs(PDL)
    offs = tl.program_id(0) * HEADS * D + tl.arange(0, HEADS * D)
    tl.store(out_ptr + offs, tl.load(q_ptr + offs))


class Layer:
    """One layer's weights, caches and the step's batch tensors for one sequence."""

    def __init__(self, hidden, H, HKV, D, context, capacity, cos_sin, device, dtype):
        self.H, self.HKV, self.D = H, HKV, D
        n = (H + 2 * HKV) * D
        self.g = (torch.rand(hidden, device=device) + 0.5).to(dtype)
        self.w_qkv = (torch.randn(n, hidden, device=device) * hidden ** -0.5).to(dtype)
        self.w_o = (torch.randn(hidden, H * D, device=device) * (H * D) ** -0.5).to(dtype)
        blocks = triton.cdiv(capacity, BLOCK_SIZE)
        self.k_cache, self.v_cache = (torch.randn(blocks, BLOCK_SIZE, HKV, D, device=device).to(dtype)
                                      for _ in range(2))
        self.tables = torch.arange(blocks, device=device, dtype=torch.int32)[None]
        self.seq_lens = torch.tensor([context], device=device, dtype=torch.int32)
        last = torch.tensor([context - 1], device=device)  # this step's token: its position is its slot
        self.rope = Rope(NEOX, last, cos_sin, last, self.k_cache, self.v_cache, H, HKV, D)

    def qkv(self, x):
        return rope_gemv(x, None, self.g, 1e-5, self.w_qkv, None, self.rope)[0]

    def attention(self, row: str, q):
        H, HKV, D = self.H, self.HKV, self.D
        if row == "none":
            return q
        out = torch.empty_like(q)
        if row in ("empty", "empty (launch first)"):
            _empty_kernel[(1,)](FIRST=row != "empty", **launch_args(q.device))
            return q
        if row == "copy":
            _copy_q_kernel[(HKV,)](q, out, HEADS=H // HKV, D=D, **launch_args(q.device))
            return out
        kwargs, _ = ATTENTION_ROWS[row]
        return decode_attention(q.view(1, H, D), self.k_cache, self.v_cache, self.tables, self.seq_lens, D ** -0.5,
                                **kwargs).view(1, H * D)

    def forward(self, row: str, x):
        qkv = self.qkv(x)
        q = qkv[0, :self.H * self.D].view(1, -1)
        return float_linear(self.attention(row, q), self.w_o)


def switched(row: str):
    """The decode_attention module's switches for a row, set while the context lasts."""
    switches = ATTENTION_ROWS.get(row, ({}, {}))[1]
    return mock.patch.multiple(attention_module, **switches) if switches else contextlib.nullcontext()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama-1b", choices=[k for k in SHAPES if k != "smoke"],
                   help="one rank's attention and projections (llama-8b-tp2: Llama-3.1-8B at TP=2, no all-reduce)")
    p.add_argument("--context", type=int, default=256, help="keys in the cache, this step's token included")
    p.add_argument("--capacity", type=int, default=0, help="the block tables' width in keys (0: the shape's: "
                   "decode_latency's and scale_out's engines capture the 1B for 1024 and the 8B for 2048)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--rows", default="", help="comma-separated rows to time (default: all)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, every row once, no timing (runs on CPU)")
    args = p.parse_args()
    smoke = args.smoke
    if not smoke and not torch.cuda.is_available():
        print("benchmarks/attention_chain.py times a CUDA graph; without a GPU, --smoke checks its rows.")
        return 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16
    hidden, H, HKV, D, layers, capacity = SHAPES["smoke" if smoke else args.shape]
    context, capacity = (40, capacity) if smoke else (args.context, args.capacity or capacity)
    rows = [*BOUNDARY_ROWS, *ATTENTION_ROWS]
    if args.rows:
        asked = args.rows.split(",")
        unknown = [r for r in asked if r not in rows]
        if unknown:
            p.error(f"unknown rows {unknown}; the rows: {rows}")
        rows = [r for r in rows if r in asked]
    torch.manual_seed(0)
    inv_freq = 1.0 / (500000 ** (torch.arange(0, D, 2, device=device).float() / D))
    freqs = torch.arange(capacity, device=device).float()[:, None] * inv_freq
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), -1)
    stack = [Layer(hidden, H, HKV, D, context, capacity, cos_sin, device, dtype) for _ in range(layers)]
    x0 = torch.randn(1, hidden, device=device, dtype=dtype)

    def chain(row):
        x = x0
        for layer in stack:
            x = layer.forward(row, x)
        return x

    if smoke:
        outs = {}
        for row in rows:
            with switched(row):
                outs[row] = chain(row).float()
        ref = outs.get("merge kernel")
        for row, out in outs.items():
            err = "" if ref is None or row in BOUNDARY_ROWS else \
                f", max |diff| against the merge kernel's {(out - ref).abs().max().item():.2e}"
            print(f"{row}: ran, output {tuple(out.shape)}{err}")
        bad = [row for row, out in outs.items() if ref is not None and row not in BOUNDARY_ROWS
               and not torch.allclose(out, ref, atol=5e-2, rtol=5e-2)]
        print("smoke: every row ran" + (f"; DIFFERENT: {bad}" if bad else "; attention rows agree"))
        return 1 if bad else 0

    from triton.testing import do_bench

    graphs = {}
    for row in rows:  # every graph first, then the rounds (decode_latency.py --rounds's lesson)
        try:
            with switched(row):
                chain(row)
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    chain(row)
            graphs[row] = g
        except Exception as e:  # a tile that does not compile or fit: not a candidate
            print(f"{row}: skipped ({type(e).__name__}: {str(e)[:120]})")
    times = {row: [] for row in graphs}
    names = list(graphs)
    for r in range(args.rounds):
        for row in names[r % len(names):] + names[:r % len(names)]:
            times[row].append(do_bench(graphs[row].replay, warmup=5, rep=40, return_mode="median") * 1e3 / layers)
    props = torch.cuda.get_device_properties(device)
    print(f"device {props.name} | torch {torch.__version__} | triton {triton.__version__} | {args.shape}: hidden "
          f"{hidden}, heads {H}/{HKV} x {D}, {layers} layers | context {context} in tables of {capacity} | median of {args.rounds} "
          f"interleaved rounds")
    base = statistics.median(times["none"]) if "none" in times else None
    print(f"{'row':<30} {'us a layer':>10} {'attention adds':>15}   rounds")
    for row in names:
        us = statistics.median(times[row])
        adds = f"{us - base:15.2f}" if base is not None else f"{'':>15}"
        print(f"{row:<30} {us:10.2f} {adds}   {' '.join(f'{t:.2f}' for t in times[row])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
