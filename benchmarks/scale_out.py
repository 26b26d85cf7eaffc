"""Scale-out on a 2-GPU machine: tensor parallelism for batch-1 decode and data parallelism for
offline throughput, each against one GPU in the same run (issue 7's targets: TP=2 at least 1.75x
TP=1 tokens/s; DP=2 at least 1.9x one GPU's throughput).

Model: the Llama-3.1-8B shape (hidden 4096, 32 layers, 32 heads, 8 KV heads, intermediate 14336,
vocab 128256, untied head), random bf16 weights written once to a temp dir. All runs compiled
(decode CUDA graphs, with the all-reduces captured inside under TP). Batch-1 decode: a 128-token
prompt, --new-tokens greedy tokens; the time of a 1-token run (the prefill) is subtracted.
Throughput: --num-prompts requests (default 1000, the compiler issue's workload), prompt lengths
uniform in [128, 1024], 128 output tokens each (ignore_eos). It needs several times max_num_seqs
(128) requests to mean anything: a decode step reads every weight whatever its batch, so with
fewer requests than one GPU batches at once, two replicas each decoding half of them step about
as slowly as the one GPU decoding all (128 requests gave 1.79x). --small runs a 1B-ish shape for a
quick check.

`--no-async-scheduling` runs every configuration with its steps in turn (async scheduling, each step launched
before the last one's tokens are read back; under TP rank 0 broadcasts them on the device).
TP=2's decode-step all-reduces go through kiln's two-rank kernel by default
(codegen/kernels/two_rank_all_reduce.py); `--nccl-all-reduce` adds a TP=2 run with
KILN_TWO_RANK_ALL_REDUCE=0 (NCCL's), `--flags-all-reduce` one with KILN_TWO_RANK_PROTOCOL=flags
(the kernel's other protocol), `--one-shot-all-reduce` one with KILN_ONE_SHOT_ALL_REDUCE=1 (torch's
symmetric-memory kernel), `--unfused-all-reduce` one with KILN_FUSED_ALL_REDUCE=0 (the row-parallel
gemv, then the all-reduce kernel, where by default each gemv program sends its values to the peer as
it stores them and a receive-only all-reduce kernel sums),
`--compare-norm-at-end` one whose norm gemvs read the row for its
statistics before their product (KILN_NORM_AT_END=0), `--compare-tiles SPEC` one whose gemvs take
other tilings (KILN_GEMV_TILES=SPEC, `quant_gemm.parse_gemv_tiles`, e.g. "deep+rope=8x1024x8": the
q/k/v gemv of 8B's shapes on its own tile), `--compare-env "KILN_DECODE_BLOCK_N=32;KILN_NEWEST_ROW=1"` one
per ';'-separated set of environment switches (here the decode attention's key tile, and this step's
token read as one row instead of a masked tile), its greedy tokens compared with TP=1's as well as
TP=2's; `--compare-env KILN_TIMING_SKIP_ALL_REDUCE=1` times TP=2 without its all-reduces (wrong sums:
the most any all-reduce work could give back). `--bracket` runs the default TP=2
configuration again after the variants, so a drift along the call (the variants always run after the
default) shows as two default rows that differ. `--rounds N` runs TP=1 and the TP=2 configurations N times, interleaved
(TP=1, default, variants, TP=1, default, variants, ...), and reports each one's median: one call once gave the same
default configuration 3.273 and, three processes later, 3.511 ms/token. Each configuration's line
also gives the GPUs' SM clock range, hottest temperature and most power while its decode was timed.

    python benchmarks/scale_out.py [--small] [--skip-dp | --skip-tp] [--no-async-scheduling] [--nccl-all-reduce]
                                   [--flags-all-reduce] [--one-shot-all-reduce] [--unfused-all-reduce]
                                   [--compare-norm-at-end] [--compare-tiles SPEC]
                                   [--compare-env SPECS]
                                   [--bracket] [--rounds N] [--checkpoint DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import GpuWatch  # noqa: E402

LLAMA_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=14336, max_position_embeddings=2048, tie_word_embeddings=False,
                initializer_range=0.02, vocab_size=128256)
SMALL = dict(LLAMA_8B, hidden_size=2048, num_hidden_layers=8, intermediate_size=8192)


def decode_ms_per_token(llm, new_tokens: int, repeats: int = 3) -> float:
    from kiln import SamplingParams

    prompt = {"prompt_token_ids": list(range(1000, 1128))}

    def timed(n: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        llm.generate(prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    timed(8)  # warm up
    prefill = statistics.median(timed(1) for _ in range(repeats))
    full = statistics.median(timed(new_tokens + 1) for _ in range(repeats))
    return (full - prefill) / new_tokens * 1e3


# the TP=2 runs with another all-reduce, other gemv tiles or norm order: phase -> (the option
# that asks for it, the switch it sets, the switch's value (None: the option's own), a label)
VARIANTS = {"tp2-nccl": ("nccl_all_reduce", "KILN_TWO_RANK_ALL_REDUCE", "0", "NCCL all-reduce"),
            "tp2-flags": ("flags_all_reduce", "KILN_TWO_RANK_PROTOCOL", "flags", "two-rank all-reduce, flags protocol"),
            "tp2-one-shot": ("one_shot_all_reduce", "KILN_ONE_SHOT_ALL_REDUCE", "1", "one-shot all-reduce"),
            "tp2-tiles": ("compare_tiles", "KILN_GEMV_TILES", None, "gemv tiles"),
            "tp2-unfused": ("unfused_all_reduce", "KILN_FUSED_ALL_REDUCE", "0", "gemv, then the all-reduce kernel"),
            "tp2-norm-first": ("compare_norm_at_end", "KILN_NORM_AT_END", "0", "norm statistics first")}


def variant_switch(name: str, args) -> tuple[str, str, str]:
    """(switch, value, label) of a VARIANTS run."""
    option, switch, value, label = VARIANTS[name]
    if value is None:
        value = getattr(args, option)
        label = f"{label} {value}"
    return switch, value, label


def throughput_s(llm, work) -> float:
    from kiln import SamplingParams

    prompts = [{"prompt_token_ids": ids} for ids, _ in work]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in work]
    llm.generate(prompts[:8], params[:8], use_tqdm=False)  # warm up
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    assert sum(len(o.outputs[0].token_ids) for o in outputs) == sum(n for _, n in work)
    return elapsed


def greedy_tokens(llm, new_tokens: int = 32) -> list[list[int]]:
    from kiln import SamplingParams

    prompts = [{"prompt_token_ids": list(range(500 + 7 * i, 560 + 7 * i))} for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def phase(name: str, path: str, args) -> dict:
    """One configuration in this process: build it, measure, print a JSON line."""
    from kiln import LLM

    shape = SMALL if args.small else LLAMA_8B
    rng = random.Random(0)
    work = [([rng.randrange(6, shape["vocab_size"]) for _ in range(rng.randint(128, 1024))], 128)
            for _ in range(args.num_prompts)]
    layout = {"tp1": {}, "dp2": {"data_parallel_size": 2}}.get(name, {"tensor_parallel_size": 2})
    t0 = time.perf_counter()
    llm = LLM(path, dtype="bfloat16", max_model_len=2048, max_num_seqs=128, gpu_memory_utilization=0.85,
              async_scheduling=args.async_scheduling, **layout)
    result = {"built_s": time.perf_counter() - t0}
    if name != "dp2":
        result["tokens"] = greedy_tokens(llm)
        with GpuWatch() as watch:
            result["decode_ms"] = decode_ms_per_token(llm, args.new_tokens)
        result["gpus"] = watch.summary()
    if not name.startswith("tp2") and not args.skip_dp:
        result["throughput_s"] = throughput_s(llm, work)
    llm.shutdown()
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--skip-dp", action="store_true")
    p.add_argument("--skip-tp", action="store_true")
    p.add_argument("--checkpoint", default=None, help="a folder to keep the random checkpoint in (reused if there)")
    p.add_argument("--flags-all-reduce", action="store_true",
                   help="add a TP=2 run with KILN_TWO_RANK_PROTOCOL=flags")
    p.add_argument("--one-shot-all-reduce", action="store_true", help="add a TP=2 run with KILN_ONE_SHOT_ALL_REDUCE=1")
    p.add_argument("--nccl-all-reduce", action="store_true", help="add a TP=2 run with KILN_TWO_RANK_ALL_REDUCE=0")
    p.add_argument("--compare-tiles", default="", help="add a TP=2 run with KILN_GEMV_TILES set to this")
    p.add_argument("--compare-norm-at-end", action="store_true",
                   help="add a TP=2 run with KILN_NORM_AT_END=0 (the norm gemvs read the row for its statistics first)")
    p.add_argument("--unfused-all-reduce", action="store_true",
                   help="add a TP=2 run with KILN_FUSED_ALL_REDUCE=0 (the row-parallel gemv, then the all-reduce kernel)")
    p.add_argument("--compare-env", default="",
                   help="';'-separated sets of NAME=VALUE environment switches (e.g. KILN_UNPACK_IN_GRAPH=0): a TP=2 "
                        "run each, its greedy tokens compared with TP=1's")
    p.add_argument("--bracket", action="store_true", help="run the default TP=2 again after the variants")
    p.add_argument("--rounds", type=int, default=1,
                   help="run TP=1 and the TP=2 configurations (the default and each variant) this many times, interleaved, "
                        "and take each one's median")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="launch each step before reading the last one's tokens (default: the engine's, on for CUDA)")
    p.add_argument("--phase", help=argparse.SUPPRESS)  # (one configuration: tp1, tp2, a VARIANTS name, tp2-envN, dp2)
    return p


def main() -> None:
    args = build_parser().parse_args()
    if args.phase:
        print(json.dumps(phase(args.phase, args.checkpoint, args)))
        return
    from common import large_random_checkpoint

    shape = SMALL if args.small else LLAMA_8B
    with tempfile.TemporaryDirectory(prefix="kiln-scale-") as tmp:
        t0 = time.perf_counter()
        path = args.checkpoint or os.path.join(tmp, "model")
        if not os.path.isfile(os.path.join(path, "config.json")):
            large_random_checkpoint(path, **shape)
            print(f"checkpoint written in {time.perf_counter() - t0:.1f} s", flush=True)
        print(f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()} | torch {torch.__version__} | "
              f"shape {'small' if args.small else 'Llama-3.1-8B'} | bf16"
              f"{' | steps in turn' if args.async_scheduling is False else ' | async scheduling (on CUDA)'}", flush=True)
        results = {}
        # each configuration in a fresh process: the GPU memory of one is wholly free for the next
        envs = [spec for spec in args.compare_env.split(";") if spec]
        tp = [] if args.skip_tp else ["tp2"] + [name for name, (option, *_) in VARIANTS.items() if getattr(args, option)]
        tp += [] if args.skip_tp else [f"tp2-env{i}" for i in range(len(envs))]
        runs = (["tp1"] + tp) * args.rounds + (["tp2-again"] if args.bracket and len(tp) > 1 else [])
        for name in runs + ([] if args.skip_dp else ["dp2"]):
            flags = [a for a in sys.argv[1:] if a not in ("--checkpoint", args.checkpoint)]
            env = dict(os.environ)
            if name in VARIANTS:
                switch, value, _ = variant_switch(name, args)
                env[switch] = value
            elif name.startswith("tp2-env"):
                env.update(kv.split("=", 1) for kv in envs[int(name[len("tp2-env"):])].split(","))
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--phase", name.removesuffix("-again"),
                                  "--checkpoint", path, *flags], capture_output=True, text=True, env=env)
            if out.returncode != 0:
                sys.exit(f"{name} failed:\n{out.stderr[-4000:]}")
            result = json.loads(out.stdout.strip().splitlines()[-1])
            shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items() if k != "tokens"}
            print(f"{name}: {shown}", flush=True)
            if name in results:  # a later round: its figure joins the first's
                results[name]["rounds"].append(result["decode_ms"])
            else:
                results[name] = {**result, "rounds": [result.get("decode_ms")]}
        for name, result in results.items():  # each configuration's figure: its rounds' median
            if len(result["rounds"]) > 1:
                result["decode_ms"] = statistics.median(result["rounds"])
                print(f"{name}: decode ms/token over {len(result['rounds'])} rounds "
                      f"{[round(v, 3) for v in result['rounds']]}, median {result['decode_ms']:.3f}")

    def same(name: str, ref: str) -> str:
        """How many prompts' greedy tokens run `name` shares with run `ref`, as "k/n"."""
        a, b = results[ref]["tokens"], results[name]["tokens"]
        return f"{sum(s == t for s, t in zip(a, b))}/{len(b)}"

    rows = []
    if "tp2" in results:
        a, b = results["tp1"]["tokens"], results["tp2"]["tokens"]
        first = [next((i for i, (x, y) in enumerate(zip(s, t)) if x != y), len(s)) for s, t in zip(a, b)]
        print(f"TP=2 greedy tokens == TP=1 for {same('tp2', 'tp1')} prompts (first difference at {first})")
        rows.append(("batch-1 decode ms/token", results["tp1"]["decode_ms"], results["tp2"]["decode_ms"]))
    for name in VARIANTS:
        if name in results:
            label = variant_switch(name, args)[2]
            print(f"TP=2 {label}: greedy tokens == TP=2 (default) for {same(name, 'tp2')} prompts")
            rows.append((f"batch-1 decode ms/token, {label}", results["tp1"]["decode_ms"], results[name]["decode_ms"]))
    for i, spec in enumerate(envs):
        if f"tp2-env{i}" in results:
            print(f"TP=2 {spec}: greedy tokens == TP=1 for {same(f'tp2-env{i}', 'tp1')} prompts, == TP=2 (default) "
                  f"for {same(f'tp2-env{i}', 'tp2')}")
            rows.append((f"batch-1 decode ms/token, {spec}", results["tp1"]["decode_ms"],
                         results[f"tp2-env{i}"]["decode_ms"]))
    if "tp2-again" in results:
        print(f"TP=2 (default) again: greedy tokens == its first run for {same('tp2-again', 'tp2')} prompts")
        rows.append(("batch-1 decode ms/token, default again (last)", results["tp1"]["decode_ms"],
                     results["tp2-again"]["decode_ms"]))
    if "dp2" in results:
        rows.append((f"{args.num_prompts} requests, s", results["tp1"]["throughput_s"], results["dp2"]["throughput_s"]))
    print("\n| | one GPU | two GPUs | speedup | target |\n|---|---|---|---|---|")
    for name, one, two in rows:
        target = 1.9 if name.endswith(", s") else 1.75
        print(f"| {name} | {one:.3f} | {two:.3f} | **{one / two:.2f}x** | {target}x |")


if __name__ == "__main__":
    main()
