"""The gated MLP of Llama-3.2-1B at batch 1 as one launch (`fused_mlp.mlp_gemv`, the fuse_mlp pass's
op) against the engine's two gemvs (`rms_norm_gemv` for gate/up with the add + norm prologue,
`act_and_mul_gemv` for down with SwiGLU), each followed by the q/k/v gemv that reads the MLP's
output (the engine's from a bf16 row, the fused one's from the float32 partial sums, which every
one of its programs reads: that is what more rows of sums cost). Chains of layers in one CUDA graph
with PDL, each layer's input the last one's output, over separate weights a layer, as in a step.
Prints us a layer, % of the copy bandwidth over the layer's weight bytes, and each tiling's output
against the engine's after one layer and after the chain.

    python benchmarks/mlp_chain.py
    python benchmarks/mlp_chain.py --tiles 8x2x8x1x2,8x2x8x1x4,8x1x8x1x2
"""

from __future__ import annotations

import argparse
import sys

import torch

from kernels import copy_bandwidth
from qkv_gemv import graph_us


def parse_tile(spec: str) -> dict:
    """ROWSxTILESxWARPSxDEPTHxCOPIES -> mlp_gemv's tiling and the rows of partial sums."""
    try:
        rows, tiles, warps, depth, copies = (int(v) for v in spec.split("x"))
    except ValueError:
        raise SystemExit(f"tile {spec!r} is not ROWSxTILESxWARPSxDEPTHxCOPIES") from None
    return dict(rows=rows, tiles=tiles, num_warps=warps, depth=depth, copies=copies)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--tiles", default="8x2x8x1x2,8x2x8x1x4,8x2x8x1x1,8x1x8x1x2",
                   help="comma-separated ROWSxTILESxWARPSxDEPTHxCOPIES (the first is fused_mlp's default)")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/mlp_chain.py times Triton kernels on a CUDA device; none is available here.")
        return 1
    from kiln.codegen.kernels.fused_mlp import mlp_gemv
    from kiln.codegen.kernels.quant_gemm import act_and_mul_gemv, rms_norm_gemv

    device, dtype = torch.device("cuda"), torch.bfloat16
    H, I, L = args.hidden, args.intermediate, args.layers
    QKV = 3 * H // 2  # the 1B's q/k/v rows (32 + 2 x 8 heads of 64)
    torch.manual_seed(0)
    x0, res0 = (torch.randn(1, H, device=device, dtype=dtype) for _ in range(2))
    g = [(torch.rand(H, device=device) + 0.5).to(dtype) for _ in range(L)]
    gq = [(torch.rand(H, device=device) + 0.5).to(dtype) for _ in range(L)]
    wgu = [(torch.randn(2 * I, H, device=device) * H ** -0.5).to(dtype) for _ in range(L)]
    wd = [(torch.randn(H, I, device=device) * I ** -0.5).to(dtype) for _ in range(L)]
    wdt = [w.t().contiguous() for w in wd]
    wqkv = [(torch.randn(QKV, H, device=device) * H ** -0.5).to(dtype) for _ in range(L)]
    tiles = {spec: parse_tile(spec) for spec in filter(None, args.tiles.split(","))}
    sums = torch.zeros(L, max(t["copies"] for t in tiles.values()) * H, device=device)
    layer_bytes = (3 * I + QKV) * H * 2
    copy_gbs = copy_bandwidth(device)
    props = torch.cuda.get_device_properties(device)
    print(f"device {props.name}, torch {torch.__version__} | MLP {H} x {I} bf16 and q/k/v {QKV} x {H}, "
          f"{L} layers | copy {copy_gbs:.0f} GB/s | floor {layer_bytes / copy_gbs / 1e3:.2f} us a layer")

    def engine(layers=L):
        x, res = x0, res0
        for i in range(layers):
            qkv, res = rms_norm_gemv(x, res, gq[i], 1e-5, wqkv[i])
            x = qkv[:, :H]  # (the MLP's input: standing in for the attention's and o's output)
            gu, res = rms_norm_gemv(x, res, g[i], 1e-5, wgu[i])
            x = act_and_mul_gemv(gu, "silu", wd[i])
        return x.float().view(-1)

    def fused(tile, layers=L):
        """Layer i adds into sums[i] and zeroes sums[i - 1], which its q/k/v gemv has read (the step's
        scheme, fused_mlp's note)."""
        c = tile["copies"]
        launch = {k: v for k, v in tile.items() if k != "copies"}

        def run():
            x, res = x0, res0
            for i in range(layers):
                qkv, res = rms_norm_gemv(x, res, gq[i], 1e-5, wqkv[i], partials=i > 0)
                res = mlp_gemv(qkv[:, :H], res, g[i], 1e-5, wgu[i], wdt[i], sums[i, :c * H].view(c, H),
                               sums[(i - 1) % L, :c * H].view(c, H), **launch)
                x = sums[i, :c * H].view(c, H)
            return x
        return run

    want1, want = engine(1), engine()
    for spec, tile in tiles.items():
        errors = []
        for layers, ref in ((1, want1), (L, want)):
            sums.zero_()
            got = fused(tile, layers)().sum(0).to(dtype).float()
            errors.append((got - ref).abs().max().item() / ref.abs().max().item())
        print(f"  {spec}: max |diff| / max |x| against the engine's: one layer {errors[0]:.2e}, {L} layers "
              f"{errors[1]:.2e}")
    rows = {"engine (two gemvs)": engine} | {f"fused {spec}": fused(tile) for spec, tile in tiles.items()}
    times = {name: [] for name in rows}
    for _ in range(args.rounds):
        for name, fn in rows.items():
            sums.zero_()
            times[name].append(graph_us(fn, L))
    median = {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}
    base = median["engine (two gemvs)"]
    print(f"{'row':>28} {'us a layer (rounds)':>28} {'% copy':>7} {'x engine':>9}")
    for name, ts in times.items():
        pct = 100 * layer_bytes / (median[name] * 1e-6) / (copy_gbs * 1e9)
        print(f"{name:>28} {' '.join(f'{t:.2f}' for t in ts):>28} {pct:6.1f}% {base / median[name]:8.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
