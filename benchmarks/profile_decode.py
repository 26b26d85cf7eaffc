"""Where a batch-1 decode step spends its time on the Llama-3.2-1B shape, or with --llama-8b the
Llama-3.1-8B one (compiled, CUDA graphs):
the host (cProfile by own time, over 128 decode steps) and the device (torch.profiler: busy time
per step against wall time per step), and each kernel of the step in launch order: its device
time and the idle gap before it (from the profiler's trace; the gap is what one kernel's launch
and ramp-up cost inside the graph). A diagnostic companion to decode_latency.py. With
--tensor-parallel-size 2 the device side is rank 0's (the profiler sees this process's GPU), the
all-reduce kernels' waits for the peer included.

    python benchmarks/profile_decode.py [--quantization int8_weight_only] [--no-async-scheduling] [--host-only]
                                        [--llama-8b] [--tensor-parallel-size N]
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import json
import os
import pstats
import sys
import tempfile
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import large_random_checkpoint  # noqa: E402
from decode_latency import LLAMA_1B  # noqa: E402
from scale_out import LLAMA_8B  # noqa: E402

from kiln import LLM, SamplingParams  # noqa: E402
from kiln.runtime.demo import build_checkpoint, train_tokenizer  # noqa: E402


def kernel_table(trace_path: str, marker: str = "argmax") -> None:
    """Per kind of kernel (name, grid, and the kernel launched before it: o and down are the same
    gemv on the same grid at TP=2, after the attention and after gate/up) in one decode step:
    launches, its span (start to end) and
    how far it moves the step's end past the previous kernel's end ("adds": its device time plus
    the idle gap before it; with programmatic dependent launch a kernel starts before the previous
    one ends, so its span overlaps and only "adds" sums to the step), in us, medians over the
    profiled steps, in the order a step launches them. A step ends with
    the kernel whose name holds `marker`, any case (the greedy sampler's argmax: one a step); only steps of
    the most common kernel count (the decode steps) are kept."""
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    steps, current = [], []
    for e in kernels:
        current.append(e)
        if marker in e["name"].lower():
            steps.append(current)
            current = []
    per_step = collections.Counter(len(s) for s in steps).most_common(1)[0][0]
    pairs = [(a, b) for a, b in zip(steps, steps[1:]) if len(a) == len(b) == per_step]
    between = sorted(b[0]["ts"] - a[-1]["ts"] - a[-1]["dur"] for a, b in pairs)
    if pairs:  # what the device does from one step's last kernel to the next one's sixth, copies included
        a, b = pairs[len(pairs) // 2]
        t0, t1 = a[-1]["ts"] + a[-1]["dur"], b[min(5, len(b) - 1)]["ts"]
        copies = [e for e in events if e.get("cat") in ("gpu_memcpy", "gpu_memset") and t0 <= e["ts"] <= t1]
        print("between two steps (the middle pair): start us after the last step's end, us long, what")
        for e in sorted(copies + b[:6], key=lambda e: e["ts"]):
            print(f"  {e['ts'] - t0:8.1f} {e['dur']:7.2f}  {e['cat']:10} {e['name'][:70]}")
    steps = [s for s in steps if len(s) == per_step]
    rows: dict[tuple, list] = {}
    def kind(e):
        return e["name"][:60], tuple(e.get("args", {}).get("grid", ()))

    for i, e in enumerate(steps[0]):  # the kinds of kernel, in a step's order
        before = kind(steps[0][i - 1]) if i else ("", ())
        rows.setdefault((*kind(e), before[0][:24] + (str(before[1]) if before[1] else "")), []).append(i)
    def end(e):
        return e["ts"] + e["dur"]

    total = 0.0
    print(f"{len(steps)} steps of {per_step} kernels | kernel, grid, launches a step, median span us, "
          f"median adds us, adds us a step, the kernel before it")
    for (name, grid, before), idx in rows.items():
        spans = sorted(s[i]["dur"] for s in steps for i in idx)
        adds = sorted(end(s[i]) - (end(s[i - 1]) if i else s[i]["ts"]) for s in steps for i in idx)
        d, a = spans[len(spans) // 2], adds[len(adds) // 2]
        total += a * len(idx)
        print(f"  {name:60} {str(grid):16} {len(idx):4} {d:8.2f} {a:7.2f} {a * len(idx):9.1f}  after {before}")
    span = sorted(end(s[-1]) - s[0]["ts"] for s in steps)[len(steps) // 2]
    print(f"  a step: {span:.1f} us from its first kernel's start to its last's end (sum of the medians {total:.1f}); "
          f"the device idle {between[len(between) // 2] if between else float('nan'):.1f} us between steps")


def host_phases(llm, prompt, params, steps: int) -> None:
    """The host's turn of a decode step, by phase (mean us a step, no profiler): the engine's
    methods are wrapped with timers for one generate call. "waits" is the time spent blocked on the
    device (the previous step's tokens); the rest of a step is host work the device must hide."""
    from kiln.runtime import model_runner

    engine = llm.llm_engine
    totals: dict[str, float] = collections.defaultdict(float)

    def timed(owner, name, label):
        fn = getattr(owner, name)

        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                totals[label] += time.perf_counter() - t
        setattr(owner, name, wrapper)
        return fn

    runner = engine.runner
    originals = [(engine, "step", timed(engine, "step", "step (all)")),
                 (engine.scheduler, "schedule", timed(engine.scheduler, "schedule", "schedule")),
                 (runner, "execute", timed(runner, "execute", "execute (inputs + replay)")),
                 (runner, "compute_logits", timed(runner, "compute_logits", "compute_logits")),
                 (engine.sampler, "tokens", timed(engine.sampler, "tokens", "sampler.tokens")),
                 (engine, "_advance", timed(engine, "_advance", "advance (blocks)")),
                 (engine, "_collect", timed(engine, "_collect", "collect (waits included)")),
                 (engine, "_append_token", timed(engine, "_append_token", "  of which append_token")),
                 (engine, "_output", timed(engine, "_output", "  of which outputs")),
                 (engine, "has_unfinished_requests", timed(engine, "has_unfinished_requests", "has_unfinished (LLM loop)"))]
    graphs = runner.decode_graphs
    if graphs is not None and not hasattr(graphs, "stage"):  # (rank 0's under TP: the graphs behind the sends)
        originals.append((graphs, "run", timed(graphs, "run", "  of which inputs to the workers + replay")))
        graphs = graphs.graphs
    if graphs is not None:
        originals.append((graphs, "stage", timed(graphs, "stage", "  of which stage")))
        for graph in graphs.graphs.values():
            originals.append((graph, "replay", timed(graph, "replay", "  of which replay")))
    token_ids = model_runner.PendingTokens.token_ids
    timed(model_runner.PendingTokens, "token_ids", "  of which waits")
    snapshot = model_runner.PendingTokens.__post_init__
    timed(model_runner.PendingTokens, "__post_init__", "pending tokens (pinned copy, event)")
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    try:
        sync()
        t0 = time.perf_counter()
        llm.generate(prompt, params, use_tqdm=False)
        sync()
        wall = time.perf_counter() - t0
    finally:
        model_runner.PendingTokens.token_ids = token_ids
        model_runner.PendingTokens.__post_init__ = snapshot
        for owner, name, _ in originals:
            delattr(owner, name)  # the instance attribute shadowed the class's method
    print(f"host phases, us a step (wall {wall / steps * 1e6:.1f} us a step):")
    for label, total in totals.items():
        print(f"  {label:28} {total / steps * 1e6:8.1f}")
    busy = totals["step (all)"] - totals["  of which waits"]
    print(f"  {'host busy (step - waits)':28} {busy / steps * 1e6:8.1f}")
    named = sum(totals[k] for k in ("schedule", "execute (inputs + replay)", "compute_logits", "sampler.tokens",
                                    "advance (blocks)", "collect (waits included)", "pending tokens (pinned copy, event)"))
    print(f"  {'step, outside those phases':28} {(totals['step (all)'] - named) / steps * 1e6:8.1f}")
    print(f"  {'generate, outside step':28} {(wall - totals['step (all)']) / steps * 1e6:8.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quantization", default=None)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="launch each step before reading the last one's tokens (default: the engine's, on for CUDA)")
    p.add_argument("--cublas", action="store_true", help="compilation_config float_gemv=False (cuBLAS at batch 1)")
    p.add_argument("--no-pdl", action="store_true", help="compilation_config pdl=False")
    p.add_argument("--host-only", action="store_true", help="only the host's phases (no profilers)")
    p.add_argument("--kernels-only", action="store_true",
                   help="stop after the kernel table (no host phases, no cProfile: a TP=2 8B run's host profile "
                        "takes minutes)")
    p.add_argument("--llama-8b", action="store_true", help="the Llama-3.1-8B shape (random weights written to disk)")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--checkpoint", default=None,
                   help="with --llama-8b: a folder to keep its random checkpoint in (reused if there)")
    args = p.parse_args()
    tmp = tempfile.TemporaryDirectory(prefix="kiln-prof-")
    if args.llama_8b:
        path = args.checkpoint or os.path.join(tmp.name, "model")
        if not os.path.isfile(os.path.join(path, "config.json")):
            large_random_checkpoint(path, **LLAMA_8B)
    else:
        path = build_checkpoint(tmp.name, "LlamaForCausalLM", dtype="bfloat16", tokenizer=train_tokenizer(),
                                vocab_size=128256, **LLAMA_1B)
    llm = LLM(path, dtype="bfloat16", enforce_eager=False, max_num_seqs=8, max_model_len=1024,
              enable_prefix_caching=False, quantization=args.quantization,
              tensor_parallel_size=args.tensor_parallel_size,
              async_scheduling=args.async_scheduling,
              compilation_config={**({"float_gemv": False} if args.cublas else {}), "pdl": not args.no_pdl})
    prompt = {"prompt_token_ids": list(range(100, 228))}
    params = SamplingParams(temperature=0, max_tokens=args.steps, ignore_eos=True)
    llm.generate(prompt, params, use_tqdm=False)

    if args.host_only:
        host_phases(llm, prompt, params, args.steps)
        host_phases(llm, prompt, params, args.steps)
        return
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    llm.generate(prompt, params, use_tqdm=False)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        llm.generate(prompt, params, use_tqdm=False)
        torch.cuda.synchronize()
    busy = sum(e.self_device_time_total for e in prof.key_averages()) / 1e6
    print(f"wall {wall / args.steps * 1e3:.3f} ms/step | device busy {busy / args.steps * 1e3:.3f} ms/step "
          f"({busy / wall:.0%} of wall)")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=20, max_name_column_width=70))
    trace = os.path.join(tmp.name, "trace.json")
    prof.export_chrome_trace(trace)
    kernel_table(trace)
    if args.kernels_only:
        llm.shutdown()
        tmp.cleanup()
        return

    host_phases(llm, prompt, params, args.steps)

    profile = cProfile.Profile()
    profile.enable()
    llm.generate(prompt, params, use_tqdm=False)
    torch.cuda.synchronize()
    profile.disable()
    pstats.Stats(profile).sort_stats("tottime").print_stats(25)
    tmp.cleanup()


if __name__ == "__main__":
    main()
