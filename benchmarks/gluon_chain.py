"""The 1B's 16 layers of batch-1 gemvs as one persistent Gluon launch with a deep TMA stream
(`codegen/kernels/gluon_chain.py`, an experiment: session 31) against the engine's 64 launches.

The chain is session 31's persistent chain (commit 13cf3dd): per layer q/k/v, o, gate/up and down
products of one row, bf16. Rows: median us a chain (L2 flushed between replays) of `--rounds`
interleaved rounds, % of the copy bandwidth over the weight bytes, the ratio to the engine's chain,
and the error of the output after 1 and 3 layers against the float32 chain.

    python benchmarks/gluon_chain.py [--configs 128x8x32x8,...]
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from kernels import copy_bandwidth
from qkv_gemv import graph_us

L, H, I, NQKV = 16, 2048, 8192, 3072


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="128x8x16x8x0x8x1x1,128x8x16x8x0x8x0x1,128x8x16x8x0x8x1x0,128x8x16x8x0x8x0x0",
                   help="comma-separated PROGRAMSxBOX_ROWSxSTAGESxWARPSxFENCExXVECxSYNCxCOMPUTE")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/gluon_chain.py times Gluon kernels on a Hopper GPU; none is available here.")
        return 1
    import triton

    from kiln.codegen.kernels import gluon_chain
    from kiln.codegen.kernels.quant_gemm import act_and_mul_gemv, float_linear

    device, dtype = torch.device("cuda"), torch.bfloat16
    props = torch.cuda.get_device_properties(device)
    torch.manual_seed(0)

    def stacked(n, k):
        return (torch.randn(L, n, k, device=device) * k ** -0.5).to(dtype)

    ws = stacked(NQKV, H), stacked(H, H), stacked(2 * I, H), stacked(H, I)
    x = torch.randn(H, device=device).to(dtype)
    weight_bytes = sum(w.numel() * w.element_size() for w in ws)
    copy_gbs = copy_bandwidth(device)
    print(f"device {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, triton "
          f"{triton.__version__} | {L} layers, {weight_bytes / 1e9:.3f} GB bf16 | copy {copy_gbs:.0f} GB/s | floor "
          f"{weight_bytes / copy_gbs / 1e3:.1f} us")
    refs = {n: gluon_chain.reference(x, *(w[:n] for w in ws)).float() for n in (1, 3)}

    def engine(*ws):
        row = x[None]
        for layer in range(ws[0].shape[0]):
            qkv = float_linear(row, ws[0][layer])
            o = float_linear(qkv[:, :H], ws[1][layer])
            gu = float_linear(o, ws[2][layer])
            row = act_and_mul_gemv(gu, "silu", ws[3][layer])
        return row[0]

    runs, errors = {"engine (64 launches)": engine}, {}
    for spec in filter(None, args.configs.split(",")):
        g, bn, stages, warps, fence, xvec, sync, compute = (int(v) for v in spec.split("x"))
        counter = torch.zeros(gluon_chain.counter_words(g), dtype=torch.int32, device=device)

        def run(*w, g=g, bn=bn, stages=stages, warps=warps, counter=counter, fence=fence, xvec=xvec, sync=sync,
                compute=compute):
            return gluon_chain.gluon_chain(x, *w, programs=g, bn=bn, stages=stages, num_warps=warps,
                                           counter=counter, max_spins=1 << 20, fence=bool(fence), xvec=xvec,
                                           sync=bool(sync), compute=bool(compute))
        runs[f"gluon {spec}"] = run
    times = {name: [] for name in runs}
    for name, fn in list(runs.items()):
        try:
            errs = []
            for n, ref in refs.items():
                out = fn(*(w[:n] for w in ws)).float()
                errs.append(((out - ref).norm() / ref.norm()).item())
            fn(*ws)
            torch.cuda.synchronize()
            errors[name] = errs
            if name.startswith("gluon"):
                counter = fn.__kwdefaults__["counter"]
                assert not counter.any(), f"{name}: counter left at {counter.nonzero().flatten().tolist()}"
        except Exception as e:
            print(f"{name}: {type(e).__name__}: {str(e)[:300]}")
            del runs[name], times[name]
    for _ in range(args.rounds):
        for name, fn in runs.items():
            times[name].append(graph_us(lambda: fn(*ws), 1))
    base = statistics.median(times["engine (64 launches)"])
    print(f"{'chain':>24} {'median us':>10} {'% of copy':>10} {'x engine':>9} {'err 1 layer':>12} {'3 layers':>9}  rounds")
    for name, ts in times.items():
        us = statistics.median(ts)
        pct = 100 * weight_bytes / (us * 1e-6) / (copy_gbs * 1e9)
        print(f"{name:>24} {us:10.1f} {pct:9.1f}% {base / us:8.3f}x {errors[name][0]:12.2e} {errors[name][1]:9.2e}  "
              + " ".join(f"{t:.1f}" for t in ts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
