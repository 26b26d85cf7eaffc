"""The host's share of a decode step: wall time outside the model's forward calls, per step, for
a batch of requests decoding together on a tiny model (so that, on a CPU, what is measured is the
engine's own work: scheduling, inputs, sampling, detokenizing, outputs). No peer: it tracks kiln
against itself from commit to commit.

    python benchmarks/decode_host.py [--batch 64 --new-tokens 64 --repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from kiln import LLM, SamplingParams
from kiln.runtime.demo import build_checkpoint


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=50)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="launch each step before reading the last one's tokens (default: the engine's, on for CUDA)")
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = build_checkpoint(tmp, "LlamaForCausalLM", max_position_embeddings=max(512, args.prompt_len + args.new_tokens))
        llm = LLM(path, dtype="float32", enable_prefix_caching=False, max_num_seqs=args.batch,
                  async_scheduling=args.async_scheduling)
        # ids 10.. wrapped into the demo tokenizer's 384 (the same prompts as before for short ones)
        prompts = [{"prompt_token_ids": [10 + (i + j) % 370 for j in range(args.prompt_len)]} for i in range(args.batch)]
        params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
        llm.generate(prompts, params, use_tqdm=False)
        runner, forward_s = llm.llm_engine.runner, [0.0]
        forward = runner.forward

        def timed_forward(*a, **k):
            t0 = time.perf_counter()
            out = forward(*a, **k)
            forward_s[0] += time.perf_counter() - t0
            return out

        runner.forward = timed_forward
        rests = []
        for _ in range(args.repeats):
            forward_s[0] = 0.0
            t0 = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            rests.append((time.perf_counter() - t0 - forward_s[0]) / args.new_tokens)
    print(f"batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens, tiny Llama, 1 thread"
          f"{', async scheduling' if llm.llm_engine.async_scheduling else ', steps in turn'}")
    print(f"host time per step outside the forward: median {statistics.median(rests) * 1e3:.2f} ms "
          f"(runs: {' '.join(f'{r * 1e3:.2f}' for r in rests)})")


if __name__ == "__main__":
    main()
