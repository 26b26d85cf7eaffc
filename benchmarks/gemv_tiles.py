"""Several row tiles a gemv program (`quant_gemm._gemv_tiles_kernel`) against the plain gemv's one,
on the Llama-3.2-1B batch-1 matrices, as chains of launches (one CUDA graph, PDL on, as in a step).

Each matrix is timed in the form the step runs it: gate/up with the residual add and norm in its
prologue, down with SwiGLU, o and q/k/v bare (the step's q/k/v has a rotary epilogue, which only
the plain gemv has: its row here is what the tiles would do without it). Weights bf16, or int8 /
fp8 weight-only. A tiling is ROWSxKxWARPSxTILES[xDEPTH] (`GemmConfig`: tiles a program, the steps
loaded ahead). Per launch: us, % of the copy bandwidth over the weight bytes, and the ratio to the
engine's default tiling. The chains favour what the step may not (session 29: bf16 tiles that won
here lost in the step), so a winner is confirmed with `decode_latency.py --compare-gemv-tiles`.

    python benchmarks/gemv_tiles.py [--weights int8] [--matrices gate_up,down] [--tilings gate_up=2x2048x4x4,...]
"""

from __future__ import annotations

import argparse
import sys

import torch

from gemv_prologue import MATRICES
from kernels import copy_bandwidth
from qkv_gemv import graph_us

# tilings timed by default (rows x K step x warps x tiles [x depth]), per weight width
TILINGS = {
    2: {"gate_up": ["4x2048x8x4x2", "4x2048x8x2", "2x2048x8x4", "4x2048x4x2"],
        "down": ["2x8192x8x2", "2x4096x8x2", "4x2048x8x2x2", "1x8192x4x4x2"],
        "qkv": ["2x2048x4x2", "2x2048x8x2", "1x2048x4x4x2"], "o": ["2x2048x4x2", "1x2048x4x2", "2x2048x8x2"]},
    1: {"gate_up": ["2x2048x4x4", "4x2048x8x4", "4x2048x8x8x2", "8x2048x8x4"],
        "down": ["4x8192x8x2", "4x4096x8x2", "1x8192x4x4x2", "2x8192x8x2"],
        "qkv": ["2x2048x8x2", "4x2048x4x2x2"], "o": ["2x2048x8x2", "4x2048x4x2x2"]},
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default="bf16", choices=["bf16", "int8", "fp8"])
    p.add_argument("--matrices", default="gate_up,down,qkv,o")
    p.add_argument("--tilings", default="", help="MATRIX=TILING,... in place of the defaults for those matrices")
    p.add_argument("--chain", type=int, default=8)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/gemv_tiles.py times Triton kernels on a CUDA device; none is available here.")
        return 1
    import triton

    from kiln.codegen.kernels.quant_gemm import (
        GemmConfig, act_and_mul_gemv, float_linear, pick_config, rms_norm_gemv, weight_only_linear,
    )
    from kiln.ir import quant_ops as Q

    device, dtype = torch.device("cuda"), torch.bfloat16
    width = 2 if args.weights == "bf16" else 1
    given: dict[str, list[str]] = {}
    for item in filter(None, args.tilings.split(",")):
        name, _, tiling = item.partition("=")
        given.setdefault(name, []).append(tiling)
    tilings = {**TILINGS[width], **given}
    props = torch.cuda.get_device_properties(device)
    copy_gbs = copy_bandwidth(device)
    print(f"device {props.name}, torch {torch.__version__}, triton {triton.__version__} | {args.weights} weights | "
          f"copy {copy_gbs:.0f} GB/s | chains of {args.chain}")
    torch.manual_seed(0)
    for name in args.matrices.split(","):
        N, K = MATRICES[name]
        w = (torch.randn(N, K, device=device) * K ** -0.5).to(dtype)
        scale = None
        if width == 1:
            w, scale = Q.quantize_weight(w.float(), args.weights)
        copies = [w] + [w.clone() for _ in range(args.chain - 1)]
        weight_bytes = w.numel() * w.element_size()
        x = torch.randn(1, 2 * K if name == "down" else K, device=device, dtype=dtype)
        residual = torch.randn(1, K, device=device, dtype=dtype)
        g = (torch.rand(K, device=device) + 0.5).to(dtype)

        def gemv(c, config=None):
            if name == "gate_up":
                return rms_norm_gemv(x, residual, g, 1e-5, c, config=config, w_scale=scale)[0]
            if name == "down":
                return act_and_mul_gemv(x, "silu", c, config=config, w_scale=scale)
            if width == 1:
                return weight_only_linear(x, c, scale, None, config=config)
            return float_linear(x, c, config=config)

        default = pick_config(1, N, K, dtype, props.multi_processor_count, w.dtype)
        ref = gemv(w).float()
        base = graph_us(lambda: [gemv(c) for c in copies], args.chain)
        pct = lambda us: 100 * weight_bytes / (us * 1e-6) / (copy_gbs * 1e9)  # noqa: E731
        form = {"gate_up": "add + norm prologue", "down": "SwiGLU prologue"}.get(name, "bare")
        default_tiling = f"{default.block_n}x{default.block_k}x{default.num_warps}x{default.tiles}"
        print(f"\n{name} {N} x {K}, {form}: the default ({default_tiling}) {base:.2f} us, {pct(base):.0f}%")
        for tiling in tilings.get(name, []):
            block_n, block_k, warps, tiles, *depth = (int(v) for v in tiling.split("x"))
            config = GemmConfig("gemv", 1, block_n, block_k, num_warps=warps, tiles=tiles, depth=(depth or [1])[0])
            err = ((gemv(w, config).float() - ref).abs().max() / ref.abs().max()).item()
            if err > 2e-2:
                print(f"  {tiling:>14}  WRONG (relative error {err:.3g})")
                continue
            us = graph_us(lambda: [gemv(c, config) for c in copies], args.chain)
            print(f"  {tiling:>14} {us:8.2f} us {pct(us):5.0f}%  ({base / us:.3f}x the default)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
