"""The batch-1 gemv with its weights streamed through TMA (`codegen/kernels/tma_gemv.py`, an
experiment: session 31) against the engine's gemv (`float_linear`, its default tile), on the
Llama-3.2-1B matrices in bf16, each as chains of `--chain` launches over as many weight copies in
one CUDA graph (PDL on, as in a step). Rows: us a launch and % of the copy bandwidth over the weight
bytes, the output's error against the engine's.

    python benchmarks/tma_gemv.py
    python benchmarks/tma_gemv.py --configs 132x64x256x4x8 --matrices gate_up,down
"""

from __future__ import annotations

import argparse
import sys

import torch

from gemv_prologue import MATRICES
from kernels import copy_bandwidth
from qkv_gemv import graph_us

MATRICES = {**MATRICES, "lm_head": (128256, 2048)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="132x64x256x4x8,132x32x256x6x4,264x32x256x4x4,528x16x256x4x4,264x16x256x6x4",
                   help="comma-separated PROGRAMSxBLOCK_NxBLOCK_KxSTAGESxWARPS (programs: 0 for a tile each)")
    p.add_argument("--matrices", default="gate_up,down,qkv,o,lm_head")
    p.add_argument("--chain", type=int, default=8)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/tma_gemv.py times Triton kernels on a CUDA device; none is available here.")
        return 1
    import triton

    from kiln.codegen.kernels import tma_gemv
    from kiln.codegen.kernels.quant_gemm import float_linear

    device, dtype = torch.device("cuda"), torch.bfloat16
    props = torch.cuda.get_device_properties(device)
    copy_gbs = copy_bandwidth(device)
    print(f"device {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, triton "
          f"{triton.__version__} | copy {copy_gbs:.0f} GB/s | chains of {args.chain}")
    torch.manual_seed(0)
    for name in args.matrices.split(","):
        N, K = MATRICES[name]
        x = torch.randn(K, device=device).to(dtype)
        copies = [(torch.randn(N, K, device=device) * K ** -0.5).to(dtype) for _ in range(args.chain)]
        weight_bytes = N * K * 2
        ref = float_linear(x[None], copies[0])[0].float()
        rows = [("engine", graph_us(lambda: [float_linear(x[None], w) for w in copies], args.chain), 0.0)]
        for spec in filter(None, args.configs.split(",")):
            g, bn, bk, stages, warps = (int(v) for v in spec.split("x"))
            g = g or triton.cdiv(N, bn)
            descs = [tma_gemv.descriptor(w, bn, bk) for w in copies]
            try:
                out = tma_gemv.tma_gemv(x, copies[0], g, bn, bk, stages, warps, desc=descs[0]).float()
                us = graph_us(lambda: [tma_gemv.tma_gemv(x, w, g, bn, bk, stages, warps, desc=d)
                                       for w, d in zip(copies, descs)], args.chain)
            except Exception as e:  # (a config the device cannot hold: shared memory)
                print(f"{name} {spec}: {type(e).__name__}: {str(e)[:200]}")
                continue
            rows.append((f"tma {spec}", us, ((out - ref).norm() / ref.norm()).item()))
        print(f"{name} {N}x{K} ({weight_bytes / 1e6:.1f} MB, floor {weight_bytes / copy_gbs / 1e3:.2f} us)")
        for label, us, err in rows:
            print(f"  {label:>24} {us:9.2f} us {100 * weight_bytes / (us * 1e-6) / (copy_gbs * 1e9):6.1f}% "
                  f"{rows[0][1] / us:6.3f}x  err {err:.1e}")
        del copies
    return 0


if __name__ == "__main__":
    sys.exit(main())
