"""What a gemv's norm prologue costs, by what it reads: one batch-1 matrix of Llama-3.2-1B timed
as chains of launches (one CUDA graph, PDL on, as in a step) over as many weight copies, for:

- `float_linear`: the bare product, which reads its input row x;
- `rms_norm_gemv` without a residual (RMS_NORM): x and the norm weight g;
- `rms_norm_gemv` with one (ADD_RMS_NORM, the step's form for gate/up and q/k/v after the first
  layer): x, the residual and g, and its first program stores x + residual.

Each program of the gemv reads what its prologue reads (from L2) beside its own weight rows: at
gate/up's 4-row tile, 12 KB of rows for 16 KB of weights. The differences between the rows bound
what moving the residual add out of the prologue (into the gemv before, whose output it is) or
folding g into the weight would save. Per launch: us, and % of the copy bandwidth over the weight
bytes.

    python benchmarks/gemv_prologue.py
    python benchmarks/gemv_prologue.py --matrix qkv --tiles 8x1024x8,4x1024x4
"""

from __future__ import annotations

import argparse
import sys
from unittest import mock

import torch

from kernels import copy_bandwidth
from qkv_gemv import graph_us

MATRICES = {"gate_up": (16384, 2048), "qkv": (3072, 2048), "down": (2048, 8192), "o": (2048, 2048)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--matrix", default="gate_up", choices=sorted(MATRICES))
    p.add_argument("--tiles", default="", help="comma-separated ROWSxKxWARPS tilings besides the default")
    p.add_argument("--chain", type=int, default=8)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/gemv_prologue.py times Triton kernels on a CUDA device; none is available here.")
        return 1
    from kiln.codegen.kernels import quant_gemm
    from kiln.codegen.kernels.quant_gemm import float_linear, parse_gemv_tiles, pick_config, rms_norm_gemv

    device, dtype = torch.device("cuda"), torch.bfloat16
    N, K = MATRICES[args.matrix]
    props = torch.cuda.get_device_properties(device)
    copy_gbs = copy_bandwidth(device)
    torch.manual_seed(0)
    x, residual = (torch.randn(1, K, device=device, dtype=dtype) for _ in range(2))
    g = (torch.rand(K, device=device) + 0.5).to(dtype)
    w = (torch.randn(N, K, device=device) * K ** -0.5).to(dtype)
    copies = [w] + [w.clone() for _ in range(args.chain - 1)]
    weight_bytes = w.numel() * w.element_size()
    print(f"device {props.name}, torch {torch.__version__} | {args.matrix} {N} x {K} bf16 | copy {copy_gbs:.0f} GB/s | "
          f"floor {weight_bytes / copy_gbs / 1e3:.2f} us | chains of {args.chain}")

    def config(tile: str | None):
        """The launch's tiling as the engine picks it, with `tile` (ROWSxKxWARPS) as its role's tile."""
        role = quant_gemm._gemv_role(N, K)
        with mock.patch.dict(quant_gemm._GEMV_TILES, parse_gemv_tiles(f"{role}={tile}") if tile else {}):
            return pick_config(1, N, K, dtype, props.multi_processor_count, dtype)

    default = config(None)
    configs = [default] + [config(t) for t in filter(None, args.tiles.split(","))]
    print(f"{'tile':>14} {'bare us':>9} {'norm us':>9} {'add+norm us':>12} | % of copy: bare, norm, add+norm")
    for cfg in dict.fromkeys(configs):
        us = [graph_us(fn, args.chain) for fn in (
            lambda: [float_linear(x, c, config=cfg) for c in copies],
            lambda: [rms_norm_gemv(x, None, g, 1e-5, c, config=cfg) for c in copies],
            lambda: [rms_norm_gemv(x, residual, g, 1e-5, c, config=cfg) for c in copies])]
        pct = [100 * weight_bytes / (u * 1e-6) / (copy_gbs * 1e9) for u in us]
        name = f"{cfg.block_n}x{cfg.block_k}x{cfg.num_warps}" + ("*" if cfg == default else "")
        print(f"{name:>14} {us[0]:9.2f} {us[1]:9.2f} {us[2]:12.2f} | {pct[0]:.0f}% {pct[1]:.0f}% {pct[2]:.0f}%")
    print("(* the default tile)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
