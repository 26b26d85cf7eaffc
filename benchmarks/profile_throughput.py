"""Where an offline-throughput run spends its time (the Llama-3.2-1B shape with an untied head, as
throughput.py's issue-8 command builds it; compiled): each step's
stream time by kind (decode-only steps in CUDA graphs, steps with prompt tokens), from CUDA events
queued at the start of every step, and the device's busy time by kernel family (torch.profiler).
A diagnostic companion to throughput.py, not a comparison.

    python benchmarks/profile_throughput.py [--num-prompts 1000] [--profile-prompts 200]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections import defaultdict

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import report_syncs  # noqa: E402
from decode_latency import LLAMA_1B  # noqa: E402

from kiln import LLM, SamplingParams  # noqa: E402
from kiln.runtime.demo import build_checkpoint, train_tokenizer  # noqa: E402

# kernel families, matched in order against the lower-cased kernel name
FAMILIES = (("gemm", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_")),
            ("prefill attention", ("_prefill_kernel",)),
            ("decode attention", ("_decode_kernel", "_merge_kernel")),
            ("kv write / rotary", ("_write_kv", "_rotary")),
            ("norm", ("_rms_norm",)),
            ("activation", ("_act_and_mul",)),
            ("copy / memset", ("memcpy", "memset", "copy")),
            ("sampling, index, other", ("",)))


def family(name: str) -> str:
    low = name.lower()
    return next(f for f, keys in FAMILIES if any(k in low for k in keys))


def workload(n: int, vocab: int, seed: int = 0):
    rng = random.Random(seed)
    return [({"prompt_token_ids": [rng.randrange(6, vocab) for _ in range(rng.randint(128, 1024))]},
             SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)) for _ in range(n)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--profile-prompts", type=int, default=200, help="requests of the torch.profiler run")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="launch each step before reading the last one's tokens (default: the engine's, on for CUDA)")
    args = p.parse_args()
    tmp = tempfile.TemporaryDirectory(prefix="kiln-prof-")
    path = build_checkpoint(tmp.name, "LlamaForCausalLM", dtype="bfloat16", tokenizer=train_tokenizer(),
                            vocab_size=128256, **dict(LLAMA_1B, tie_word_embeddings=False))
    llm = LLM(path, dtype="bfloat16", max_num_seqs=args.max_num_seqs, enable_prefix_caching=False,
              max_num_batched_tokens=args.max_num_batched_tokens, async_scheduling=args.async_scheduling)
    work = workload(args.num_prompts, 128256)
    prompts, params = [w[0] for w in work], [w[1] for w in work]
    llm.generate(prompts[:64], params[:64], use_tqdm=False)

    # each step: a CUDA event queued when the runner starts it and one after its sampler is queued;
    # between a step's two events the stream runs the step, between that step's second event and
    # the next step's first it waits for the host (the gap)
    engine, runner = llm.llm_engine, llm.llm_engine.runner
    execute, sampler, steps = runner.execute, engine.sampler, []

    def timed_execute(step, *a, **kw):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        prompt_tokens = sum(n for _, n in step.scheduled if n > 1)
        steps.append([event, None, step.num_tokens, prompt_tokens])
        return execute(step, *a, **kw)

    class TimedSampler:  # the sampler's two entry points (async scheduling calls `tokens`)
        def _marked(self, fn, *a, **kw):
            out = fn(*a, **kw)
            steps[-1][1] = torch.cuda.Event(enable_timing=True)
            steps[-1][1].record()
            return out

        def __call__(self, *a, **kw):
            return self._marked(sampler, *a, **kw)

        def tokens(self, *a, **kw):
            return self._marked(sampler.tokens, *a, **kw)

    runner.execute, engine.sampler = timed_execute, TimedSampler()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    end = torch.cuda.Event(enable_timing=True)
    end.record()
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    runner.execute, engine.sampler = execute, sampler
    kinds = defaultdict(lambda: [0, 0.0, 0.0, 0])  # steps, stream ms in steps, ms in gaps, tokens
    for (start, done, tokens, prompt), nxt in zip(steps, [s[0] for s in steps[1:]] + [end]):
        k = kinds["decode only" if prompt == 0 else "with prompt tokens"]
        done = done or nxt
        k[0] += 1
        k[1] += start.elapsed_time(done)
        k[2] += done.elapsed_time(nxt)
        k[3] += tokens
    print(f"{args.num_prompts} requests: wall {wall:.2f} s, {len(steps)} steps")
    print(f"{'step kind':22}{'steps':>7}{'step s':>9}{'gap s':>8}{'tokens':>9}{'ms/step':>9}{'gap ms':>8}{'tok/step':>9}")
    for kind, (n, ms, gap, tokens) in kinds.items():
        print(f"{kind:22}{n:7d}{ms / 1e3:9.3f}{gap / 1e3:8.3f}{tokens:9d}{ms / n:9.3f}{gap / n:8.3f}{tokens / n:9.1f}")
    print("step: from the step's start to its sampler's last kernel queued (device work, and the device "
          "waiting on the host's launches); gap: from there to the next step's start (the host's turn)")
    report_syncs(lambda: llm.generate(prompts[:64], params[:64], use_tqdm=False), "64 requests")

    if args.profile_prompts:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            llm.generate(prompts[:args.profile_prompts], params[:args.profile_prompts], use_tqdm=False)
            torch.cuda.synchronize()
            pwall = time.perf_counter() - t0
        by_family, by_kernel = defaultdict(float), defaultdict(float)
        for e in prof.key_averages():
            if e.self_device_time_total > 0:
                by_family[family(e.key)] += e.self_device_time_total / 1e6
                by_kernel[e.key] += e.self_device_time_total / 1e6
        busy = sum(by_family.values())
        print(f"\nprofiled run, {args.profile_prompts} requests: wall {pwall:.2f} s (profiler on), device busy {busy:.2f} s")
        for name, s in sorted(by_family.items(), key=lambda kv: -kv[1]):
            print(f"  {name:26}{s:8.3f} s {s / busy:6.1%}")
        print("top kernels:")
        for name, s in sorted(by_kernel.items(), key=lambda kv: -kv[1])[:15]:
            print(f"  {s:8.3f} s  {name[:110]}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
