"""Where a batch-1 decode step spends its time on the Llama-3.2-1B shape (compiled, CUDA graphs):
the host (cProfile by own time, over 128 decode steps) and the device (torch.profiler: busy time
per step against wall time per step). A diagnostic companion to decode_latency.py.

    python benchmarks/profile_decode.py [--quantization int8_weight_only] [--async-scheduling]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from decode_latency import LLAMA_1B  # noqa: E402

from kiln import LLM, SamplingParams  # noqa: E402
from kiln.runtime.demo import build_checkpoint, train_tokenizer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quantization", default=None)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--async-scheduling", action="store_true")
    p.add_argument("--float-gemv", action="store_true", help="compilation_config float_gemv (Triton gemv at batch 1)")
    args = p.parse_args()
    tmp = tempfile.TemporaryDirectory(prefix="kiln-prof-")
    path = build_checkpoint(tmp.name, "LlamaForCausalLM", dtype="bfloat16", tokenizer=train_tokenizer(),
                            vocab_size=128256, **LLAMA_1B)
    llm = LLM(path, dtype="bfloat16", enforce_eager=False, max_num_seqs=8, max_model_len=1024,
              enable_prefix_caching=False, quantization=args.quantization,
              async_scheduling=args.async_scheduling, compilation_config={"float_gemv": args.float_gemv})
    prompt = {"prompt_token_ids": list(range(100, 228))}
    params = SamplingParams(temperature=0, max_tokens=args.steps, ignore_eos=True)
    llm.generate(prompt, params, use_tqdm=False)

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

    profile = cProfile.Profile()
    profile.enable()
    llm.generate(prompt, params, use_tqdm=False)
    torch.cuda.synchronize()
    profile.disable()
    pstats.Stats(profile).sort_stats("tottime").print_stats(25)
    tmp.cleanup()


if __name__ == "__main__":
    main()
