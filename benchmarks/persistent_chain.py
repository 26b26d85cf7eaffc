"""A stack of decoder layers' batch-1 gemvs as one persistent launch against the engine's chain of
launches (`codegen/kernels/persistent_chain.py`, an experiment: session 31).

Both compute, for each of 16 layers of the Llama-3.2-1B shape (bf16), qkv = W_qkv x, o = W_o
qkv[:H], gu = W_gu o, d = W_down (silu(gu[:I]) * gu[I:]), x = d: the engine as 64 launches
(`float_linear` x 3 and `act_and_mul_gemv`, their default tiles, PDL on) in one CUDA graph; the
persistent kernel as one launch of G programs that count instead of ending between matrices.
Rows: median us a chain (L2 flushed between replays) over `--rounds` interleaved rounds, % of the
copy bandwidth over the weight bytes, the ratio to the engine's chain, and the error of the last
output against the float32 chain's.

    python benchmarks/persistent_chain.py
    python benchmarks/persistent_chain.py --configs 256x4x8,128x8x16
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys

import torch

from kernels import copy_bandwidth
from qkv_gemv import graph_us

L, H, I, NQKV = 16, 2048, 8192, 3072


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="256x4x8x128,256x4x8x128x64,256x4x8x128x256,nosync:256x4x8x128,256x4x4x0x64",
                   help="comma-separated [nosync:]PROGRAMSxTILE_ROWSxWARPS[xMAXNREG[xFLAGS]] (nosync: no waits, "
                        "wrong outputs: the weight stream alone; FLAGS: polled lines, 0 the count itself)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--layers", type=int, default=L)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/persistent_chain.py times Triton kernels on a CUDA device; none is available here.")
        return 1
    import triton

    from kiln.codegen.kernels import persistent_chain
    from kiln.codegen.kernels.quant_gemm import act_and_mul_gemv, float_linear

    device, dtype, layers = torch.device("cuda"), torch.bfloat16, args.layers
    props = torch.cuda.get_device_properties(device)
    torch.manual_seed(0)

    def stacked(n, k):
        return (torch.randn(layers, n, k, device=device) * k ** -0.5).to(dtype)

    ws = stacked(NQKV, H), stacked(H, H), stacked(2 * I, H), stacked(H, I)
    x = torch.randn(H, device=device).to(dtype)
    weight_bytes = sum(w.numel() * w.element_size() for w in ws)
    copy_gbs = copy_bandwidth(device)
    print(f"device {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, triton "
          f"{triton.__version__} | {layers} layers of q/k/v {NQKV}x{H}, o {H}x{H}, gate/up {2 * I}x{H}, down {H}x{I} "
          f"bf16: {weight_bytes / 1e9:.3f} GB | copy {copy_gbs:.0f} GB/s | floor "
          f"{weight_bytes / copy_gbs / 1e3:.1f} us")
    # the error column: the first layer's output (random layers gate the row down to 0 within 16)
    first = tuple(w[:1] for w in ws)
    ref = persistent_chain.reference(x, *first).float()

    def engine(*ws):
        row = x[None]
        for layer in range(ws[0].shape[0]):
            qkv = float_linear(row, ws[0][layer])
            o = float_linear(qkv[:, :H], ws[1][layer])
            gu = float_linear(o, ws[2][layer])
            row = act_and_mul_gemv(gu, "silu", ws[3][layer])
        return row[0]

    runs = {"engine (64 launches)": engine}
    counters = {}
    for spec in filter(None, args.configs.split(",")):
        sync = not spec.startswith("nosync:")
        g, rows, warps, maxnreg, flags = ([int(v) for v in spec.removeprefix("nosync:").split("x")] + [0, 0])[:5]
        counters[spec] = torch.zeros(persistent_chain.counter_words(flags), dtype=torch.int32, device=device)
        runs[f"persistent {spec}"] = functools.partial(
            persistent_chain.chain_gemvs, x, programs=g, tile_rows=rows, num_warps=warps, maxnreg=maxnreg or None,
            flags=flags, counter=counters[spec], sync=sync)
    errors, times = {}, {name: [] for name in runs}
    for name, fn in list(runs.items()):
        try:
            fn(*ws)
            out = fn(*first).float()
            torch.cuda.synchronize()
        except (ValueError, RuntimeError) as e:
            print(f"{name}: {e}")
            del runs[name], times[name]
            continue
        errors[name] = ((out - ref).norm() / ref.norm()).item()
    for _ in range(args.rounds):
        for name, fn in runs.items():
            times[name].append(graph_us(lambda: fn(*ws), 1))
    base = statistics.median(times["engine (64 launches)"])
    print(f"{'chain':>26} {'median us':>10} {'% of copy':>10} {'x engine':>9} {'rel err':>9}  rounds")
    for name, ts in times.items():
        us = statistics.median(ts)
        pct = 100 * weight_bytes / (us * 1e-6) / (copy_gbs * 1e9)
        print(f"{name:>26} {us:10.1f} {pct:9.1f}% {base / us:8.3f}x {errors[name]:9.2e}  "
              + " ".join(f"{t:.1f}" for t in ts))
    for spec, c in counters.items():
        assert not c.any(), f"persistent {spec}: counter left at {c.nonzero().flatten().tolist()}"
    return 0


if __name__ == "__main__":
    sys.exit(main())
