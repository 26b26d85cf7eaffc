"""GPU check of tensor parallelism over NCCL: TP=2 gives TP=1's greedy tokens on a random Llama,
and batch-1 decode time per token of both (Llama shape from the flags), eager, or with --compiled
compiled with decode CUDA graphs (under TP the all-reduces are captured in them).

    python benchmarks/check_tensor_parallel.py [--hidden-size 4096 --num-layers 8] [--compiled] [--dtype float32]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from kiln import LLM, SamplingParams
from kiln.runtime.demo import build_checkpoint


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden-size", type=int, default=1024)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--compiled", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        h = args.hidden_size
        path = build_checkpoint(tmp, "LlamaForCausalLM", dtype=args.dtype, hidden_size=h, num_hidden_layers=args.num_layers,
                                num_attention_heads=h // 128, num_key_value_heads=max(2, h // 512),
                                intermediate_size=int(h * 3.5), initializer_range=0.02)
        prompts = [{"prompt_token_ids": list(range(10 + i, 60 + i))} for i in range(4)]
        params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
        results = {}
        for tp in (1, 2):
            llm = LLM(path, dtype=args.dtype, tensor_parallel_size=tp, enforce_eager=not args.compiled, max_model_len=512,
                      gpu_memory_utilization=0.5)
            tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
            llm.generate(prompts[0], params, use_tqdm=False)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            llm.generate(prompts[0], params, use_tqdm=False)
            torch.cuda.synchronize()
            results[tp] = (tokens, (time.perf_counter() - t0) / args.new_tokens)
            llm.shutdown()
            del llm
            torch.cuda.empty_cache()
        same = sum(a == b for a, b in zip(results[1][0], results[2][0]))
        # where greedy paths part: a sum reduced in another order may flip a near-tie, after which they differ
        first = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in zip(*(results[t][0] for t in (1, 2)))]
        print(f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()} | torch {torch.__version__} | {args.dtype}")
        print(f"TP=2 tokens == TP=1 tokens for {same}/{len(prompts)} prompts; first difference at {first}")
        for tp, (_, per_token) in results.items():
            print(f"TP={tp} {'compiled' if args.compiled else 'eager'} batch-1 decode {per_token * 1e3:.2f} ms/token")


if __name__ == "__main__":
    main()
