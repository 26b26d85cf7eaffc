"""The q/k/v gemv of a batch-1 decode step over its tilings, as chains of launches on one GPU.

In a decode step the q/k/v projection is one launch (`quant_gemm.rope_gemv`): the input norm (with
the residual add) in its prologue, rotary and the KV-cache write in its epilogue. Session 21's
TP=2 profile had it at 53% of the bandwidth on a rank of Llama-3.1-8B (11.2 us against 5.9 us of
weight bytes), where the bigger gemvs stream at 83-100%. This times it at one rank's shape, each
tiling as `--chain` launches back to back over as many weight copies in one CUDA graph (PDL on,
as in a step), per launch, against three references on the same weights:

- `float_linear`: the bare product, the default tile;
- `rms_norm_gemv`: the product with the norm prologue (what the epilogue adds is the difference);
- `rope_gemv` over the tilings of a grid.

Each row: us a launch, % of the copy bandwidth over the weight bytes, and the output's error
against the default tiling's (the k cache's slot is checked to hold the output's k columns).
Session 22 (H100): at TP=2's shape 8 x 1024 x 8 beat the default tile as a chain (12.85 against
14.03 us), but not in the whole step (codegen/NOTES.md); loading the rotary tables before the
weight stream lost at both shapes (its registers cost occupancy) and is gone.

    python benchmarks/qkv_gemv.py --model llama-8b-tp2
    python benchmarks/qkv_gemv.py --model llama-1b --chain 8
"""

from __future__ import annotations

import argparse
import sys

import torch

from kernels import copy_bandwidth, rel_error

# (hidden, q heads, kv heads, head dim) of one rank
MODELS = {"llama-1b": (2048, 32, 8, 64), "llama-8b": (4096, 32, 8, 128), "llama-8b-tp2": (4096, 16, 4, 128)}
BLOCK_SIZE, NUM_BLOCKS, MAX_POS = 16, 64, 2048


def graph_us(fn, chain: int) -> float:
    """Median us a launch of fn's chain, replayed as one CUDA graph (L2 flushed between replays)."""
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return do_bench(g.replay, warmup=10, rep=50, return_mode="median") * 1e3 / chain


def tilings(K: int) -> list:
    from kiln.codegen.kernels.quant_gemm import GemmConfig

    return [GemmConfig("gemv", 1, bn, bk, 1, num_warps=nw, num_stages=3)
            for bn in (2, 4, 8, 16) for bk in (1024, 2048, 4096) if bk <= K for nw in (4, 8)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-8b-tp2", choices=sorted(MODELS))
    p.add_argument("--chain", type=int, default=8)
    p.add_argument("--top", type=int, default=8, help="rows printed per variant, besides the default")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/qkv_gemv.py times Triton kernels on a CUDA device; none is available here.")
        return 1
    import triton

    from kiln.codegen.kernels.quant_gemm import NEOX, Rope, float_linear, pick_config, rms_norm_gemv, rope_gemv

    device, dtype = torch.device("cuda"), torch.bfloat16
    K, H, HKV, D = MODELS[args.model]
    N = (H + 2 * HKV) * D
    props = torch.cuda.get_device_properties(device)
    copy_gbs = copy_bandwidth(device)
    print(f"device {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, triton "
          f"{triton.__version__} | {args.model}: q/k/v {N} x {K} bf16, {H} q / {HKV} kv heads of {D} | copy "
          f"{copy_gbs:.0f} GB/s | chains of {args.chain}")

    torch.manual_seed(0)
    x, residual = (torch.randn(1, K, device=device, dtype=dtype) for _ in range(2))
    g = (torch.rand(K, device=device) + 0.5).to(dtype)
    w = (torch.randn(N, K, device=device) * K ** -0.5).to(dtype)
    copies = [w] + [w.clone() for _ in range(args.chain - 1)]
    inv_freq = 1.0 / (500000 ** (torch.arange(0, D, 2, device=device).float() / D))
    freqs = torch.arange(MAX_POS, device=device).float()[:, None] * inv_freq
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), -1)
    caches = [torch.zeros(NUM_BLOCKS, BLOCK_SIZE, HKV, D, device=device, dtype=dtype) for _ in range(2)]
    position, slot = torch.tensor([200], device=device), torch.tensor([5 * BLOCK_SIZE + 3], device=device)
    rope = Rope(NEOX, position, cos_sin, slot, *caches, H, HKV, D)
    weight_bytes = w.numel() * w.element_size()

    def pct(us: float) -> float:
        return 100 * weight_bytes / (us * 1e-6) / (copy_gbs * 1e9)

    default = pick_config(1, N, K, dtype, props.multi_processor_count, dtype)
    bare = graph_us(lambda: [float_linear(x, c) for c in copies], args.chain)
    norm = graph_us(lambda: [rms_norm_gemv(x, residual, g, 1e-5, c) for c in copies], args.chain)
    print(f"floor {weight_bytes / copy_gbs / 1e3:.2f} us | default tile {default.block_n} x {default.block_k} x "
          f"{default.num_warps} warps: float_linear {bare:.2f} us ({pct(bare):.0f}%), rms_norm_gemv + residual "
          f"{norm:.2f} us ({pct(norm):.0f}%)")

    reference = rope_gemv(x, residual, g, 1e-5, w, None, rope, config=default)[0].float()
    rows, failed = [], []
    for cfg in dict.fromkeys([default, *tilings(K)]):
        def run(cfg=cfg, weights=(w,)):
            for c in weights:
                out = rope_gemv(x, residual, g, 1e-5, c, None, rope, config=cfg)[0]
            return out

        try:
            caches[0].zero_()
            out = run()
            torch.cuda.synchronize()
            cached = caches[0].flatten(0, 1)[slot.item()].flatten()
            ok = torch.equal(cached, out[0, H * D:(H + HKV) * D])
            us = graph_us(lambda cfg=cfg: run(cfg, copies), args.chain)
        except Exception as e:  # out of registers or shared memory: not a candidate
            failed.append(f"{cfg.block_n}x{cfg.block_k}x{cfg.num_warps}: {type(e).__name__}")
            continue
        rows.append((us, cfg, rel_error(out.float(), reference), ok))
    rows.sort(key=lambda r: r[0])
    print(f"\nrope_gemv: {len(rows)} tilings ran" + (f", {len(failed)} did not: {failed}" if failed else ""))
    for us, cfg, err, ok in rows[:args.top] + [r for r in rows[args.top:] if r[1] == default]:
        tag = " (default)" if cfg == default else ""
        print(f"  {cfg.block_n:>2} x {cfg.block_k:<4} x {cfg.num_warps} warps {us:7.2f} us {pct(us):4.0f}% "
              f"err {err:.1e}{'' if ok else ' CACHE WRONG'}{tag}")
    wrong = [r for r in rows if not (r[2] < 2e-2 and r[3])]
    for us, cfg, err, ok in wrong:
        print(f"  WRONG {cfg.block_n} x {cfg.block_k} x {cfg.num_warps}: err {err:.1e}, cache {'ok' if ok else 'wrong'}")
    best, dflt = rows[0], next(r for r in rows if r[1] == default)
    print(f"\nsummary ({args.model}; floor {weight_bytes / copy_gbs / 1e3:.2f} us): float_linear {bare:.2f} us, "
          f"rms_norm_gemv {norm:.2f} us, rope_gemv best {best[1].block_n} x {best[1].block_k} x "
          f"{best[1].num_warps} {best[0]:.2f} us ({pct(best[0]):.0f}%), default {dflt[0]:.2f} us "
          f"({pct(dflt[0]):.0f}%), wrong {len(wrong)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
