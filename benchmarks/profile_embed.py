"""Where `LLM.embed` spends its time on a random BERT (BERT-base shape, or `--tiny-bert` on CPU):
the host's time by phase of the call (wall time inside each), the host by function (cProfile, by
own time) and, on CUDA, the device (torch.profiler, top kernels). A diagnostic companion to
embed.py, not a comparison.

    python benchmarks/profile_embed.py                                   # on a GPU
    python benchmarks/profile_embed.py --tiny-bert --threads 1           # the host's share, on CPU
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import random
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import report_syncs  # noqa: E402
from embed import WORDS, bert_base_path  # noqa: E402

from kiln import LLM  # noqa: E402
from kiln.runtime import engine as engine_module  # noqa: E402


class Phases:
    """Sums the wall time spent inside wrapped callables, per name (the host's time: on CUDA the
    device work they queue runs later)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
        return timed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny-bert", action="store_true", help="hidden 32, 2 layers: little but the host's work")
    p.add_argument("--num-sentences", type=int, default=2048)
    p.add_argument("--threads", type=int, default=None, help="torch's CPU threads")
    p.add_argument("--repeats", type=int, default=5, help="timed calls for the phase table (median)")
    args = p.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    path = bert_base_path(tempfile.mkdtemp(prefix="kiln-prof-"), "tiny" if args.tiny_bert else "base")
    llm = LLM(path, runner="pooling", dtype="bfloat16" if cuda else "float32", max_num_seqs=1024,
              max_num_batched_tokens=32768)
    rng = random.Random(0)
    sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 96))) for _ in range(args.num_sentences)]
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    llm.embed(sentences, use_tqdm=False)

    # phases: each wrapped where the engine looks it up, so nested ones are parts of their parent
    phases = Phases()
    engine, runner = llm.llm_engine, llm.llm_engine.runner
    for obj, name in ((engine, "_encode_texts"), (engine, "prepare_prompts"), (engine, "add_pooling_request"),
                      (engine, "step"), (runner, "execute_pooling"), (runner, "forward"), (engine, "_collect_pooling")):
        setattr(obj, name, phases.wrap(name, getattr(obj, name)))
    engine_module.pool_step = phases.wrap("pool_step", engine_module.pool_step)
    gc_started = []

    def on_gc(phase, info):  # the time the collector pauses the call
        if phase == "start":
            gc_started.append(time.perf_counter())
        elif gc_started:
            phases.seconds["gc"] = phases.seconds.get("gc", 0.0) + time.perf_counter() - gc_started.pop()

    gc.callbacks.append(on_gc)
    runs = []
    for _ in range(args.repeats):
        phases.seconds = {}
        sync()
        t0 = time.perf_counter()
        llm.embed(sentences, use_tqdm=False)
        sync()
        runs.append({"embed": time.perf_counter() - t0, **phases.seconds})
    med = {k: statistics.median(r.get(k, 0.0) for r in runs) for k in runs[0]}
    rows = [
        ("LLM.embed (wall)", med["embed"]),
        ("  prepare_prompts", med["prepare_prompts"]),
        ("    tokenizer (_encode_texts)", med["_encode_texts"]),
        ("    validation, arrays", med["prepare_prompts"] - med["_encode_texts"]),
        ("  add_pooling_request x N", med["add_pooling_request"]),
        ("  engine.step", med["step"]),
        ("    inputs (execute_pooling - forward)", med["execute_pooling"] - med["forward"]),
        ("    model forward", med["forward"]),
        ("    pool_step", med["pool_step"]),
        ("    collect (wait, outputs)", med["_collect_pooling"]),
        ("    schedule, rest", med["step"] - med["execute_pooling"] - med["pool_step"] - med["_collect_pooling"]),
        ("  _run loop, output objects", med["embed"] - med["prepare_prompts"] - med["add_pooling_request"] - med["step"]),
    ]
    n = len(sentences)
    # every call, so that a slow call shows which phase made it slow
    print("calls, ms: " + "embed / tokenizer / add_pooling_request / step / forward / collect / gc pauses")
    for r in runs:
        print("  " + " / ".join(f"{r.get(k, 0.0) * 1e3:.1f}" for k in
                                ("embed", "_encode_texts", "add_pooling_request", "step", "forward",
                                 "_collect_pooling", "gc")))
    print(f"phases, median of {args.repeats} calls ({n} sentences):")
    print(f"{'':40}{'ms':>9}{'us/sentence':>13}")
    for label, seconds in rows:
        print(f"{label:40}{seconds * 1e3:9.1f}{seconds / n * 1e6:13.1f}")

    profile = cProfile.Profile()
    profile.enable()
    llm.embed(sentences, use_tqdm=False)
    sync()
    profile.disable()
    pstats.Stats(profile).sort_stats("tottime").print_stats(18)
    if cuda:
        report_syncs(lambda: llm.embed(sentences, use_tqdm=False), "one embed call")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                                torch.profiler.ProfilerActivity.CPU]) as prof:
            llm.embed(sentences, use_tqdm=False)
            torch.cuda.synchronize()
        events = prof.key_averages()  # (each table ends with the device's busy time, "Self CUDA time total")
        print(events.table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=50))
        print(events.table(sort_by="self_cuda_time_total", row_limit=10, max_name_column_width=50))


if __name__ == "__main__":
    main()
