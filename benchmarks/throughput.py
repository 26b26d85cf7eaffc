"""Offline throughput: kiln `LLM.generate` against Hugging Face transformers `generate`.

Both sides run the same Llama-shaped model (random weights, built in a temp dir with
`kiln.runtime.demo.build_checkpoint`, or an existing checkpoint via --model) in the same process,
on the same device, in the same dtype, over the same prompts taken in the same order.

Workload: --num-prompts random prompts of token ids (uniform lengths in [--min-input, --max-input],
ids drawn from the vocabulary minus the special ids 0..5), each with its own output length L
(uniform in [--min-output, --max-output]). Every request generates exactly L tokens, greedily:

* kiln: all requests are handed to one `LLM.generate` call with
  SamplingParams(temperature=0, max_tokens=L, ignore_eos=True); the engine batches them
  continuously. Prefix caching is off, so repeats and the warm-up cannot reuse cached prompts.
* HF: static batches of --hf-batch-size consecutive prompts, left-padded with an attention mask,
  greedy, max_new_tokens = min_new_tokens = the largest L in the batch (so EOS never stops a row
  early). Only the L tokens each prompt asked for count as useful output: the extra tokens the
  shorter requests of a batch are dragged through are the cost of padded static batching.

Each side gets one short warm-up (every prompt once, 2 output tokens each), then
--repeats timed runs, alternating kiln and HF (time.perf_counter, synchronised on CUDA); the median
is reported as output tokens/s and total (prompt + output) tokens/s. Both sides count the same
tokens, so the two ratios are equal.

    python benchmarks/throughput.py                    # tiny model, defaults sized for a small CPU
    python benchmarks/throughput.py --device cuda --hidden-size 2048 --num-layers 16 --num-heads 16 \\
        --num-kv-heads 8 --intermediate-size 5632 --num-prompts 256
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from kiln.runtime.llm import LLM
from kiln.runtime.sampling_params import SamplingParams

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_and_dtype, header, random_llama, runs  # noqa: E402

FIRST_ID = 6  # ids 0..5 are the demo tokenizer's special tokens


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--min-input", type=int, default=16)
    p.add_argument("--max-input", type=int, default=256)
    p.add_argument("--min-output", type=int, default=16)
    p.add_argument("--max-output", type=int, default=128)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-heads", type=int, default=8)
    p.add_argument("--num-kv-heads", type=int, default=4)
    p.add_argument("--intermediate-size", type=int, default=688)
    p.add_argument("--vocab-size", type=int, default=None, help="default: the demo tokenizer's (384)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--hf-batch-size", type=int, default=8)
    p.add_argument("--max-num-seqs", type=int, default=256, help="kiln's max concurrent sequences")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--model", default=None, help="an existing checkpoint instead of a random one")
    p.add_argument("--model-impl", choices=["kiln", "transformers"], default="kiln",
                   help="transformers: also time kiln's Transformers modeling backend against the native model")
    p.add_argument("--quantization", default=None, help="also time kiln with this quantization (e.g. fp8)")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="launch each step before reading the last one's tokens (default: the engine's, on for CUDA)")
    p.add_argument("--no-hf", action="store_true", help="skip HF (with --quantization: bf16 against quantized only)")
    return p.parse_args()


def make_workload(args, vocab_size: int, rng: random.Random) -> list[tuple[list[int], int]]:
    """[(prompt token ids, output length)], in the order both sides process them."""
    return [([rng.randrange(FIRST_ID, vocab_size) for _ in range(rng.randint(args.min_input, args.max_input))],
             rng.randint(args.min_output, args.max_output)) for _ in range(args.num_prompts)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_kiln(llm: LLM, work) -> int:
    prompts = [{"prompt_token_ids": ids} for ids, _ in work]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in work]
    outs = llm.generate(prompts, params, use_tqdm=False)
    got = [len(o.outputs[0].token_ids) for o in outs]
    assert got == [n for _, n in work], "kiln generated a different number of tokens than requested"
    return sum(got)


@torch.inference_mode()
def run_hf(model, work, batch_size: int, pad_id: int, device: torch.device) -> int:
    useful = 0
    for start in range(0, len(work), batch_size):
        batch = work[start:start + batch_size]
        width, new = max(len(ids) for ids, _ in batch), max(n for _, n in batch)
        input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids, _ in batch], device=device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _ in batch], device=device)
        out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                             min_new_tokens=new, pad_token_id=pad_id)
        assert out.shape[1] - width == new, "HF stopped before max_new_tokens"
        useful += sum(n for _, n in batch)  # only what each request asked for
    return useful


def timed(fn, device: torch.device) -> tuple[float, int]:
    sync(device)
    t0 = time.perf_counter()
    tokens = fn()
    sync(device)
    return time.perf_counter() - t0, tokens


def main() -> None:
    args = parse_args()
    device, dtype = device_and_dtype(args.device, args.dtype)
    torch.manual_seed(args.seed)
    path, tmp = random_llama(args, dtype, args.max_input + args.max_output,
                             **({"vocab_size": args.vocab_size} if args.vocab_size else {}))
    config = AutoConfig.from_pretrained(path)
    work = make_workload(args, config.vocab_size, random.Random(args.seed))
    warmup = [(ids, 2) for ids, _ in work]  # every prompt shape once, 2 tokens each
    prompt_tokens = sum(len(ids) for ids, _ in work)

    llm = LLM(path, dtype=dtype, max_num_seqs=args.max_num_seqs, seed=args.seed, device=device.type,
              enable_prefix_caching=False, model_impl="kiln", async_scheduling=args.async_scheduling)
    hf = None if args.no_hf else AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    sides = {"kiln": lambda w: run_kiln(llm, w)}
    if hf is not None:
        sides["hf"] = lambda w: run_hf(hf, w, args.hf_batch_size, pad_id, device)
    if args.model_impl == "transformers":
        backend = LLM(path, dtype=dtype, max_num_seqs=args.max_num_seqs, seed=args.seed, device=device.type,
                      enable_prefix_caching=False, model_impl="transformers")
        sides["kiln-transformers"] = lambda w: run_kiln(backend, w)
    if args.quantization:
        quantized = LLM(path, dtype=dtype, max_num_seqs=args.max_num_seqs, seed=args.seed, device=device.type,
                        enable_prefix_caching=False, model_impl="kiln", quantization=args.quantization)
        sides["kiln-quantized"] = lambda w: run_kiln(quantized, w)
    for run in sides.values():
        run(warmup)
    # alternate the sides, so that a noisy spell on the machine hits both rather than one
    times, useful = {name: [] for name in sides}, {}
    for _ in range(args.repeats):
        for name, run in sides.items():
            secs, useful[name] = timed(lambda: run(work), device)
            times[name].append(secs)
    kiln_out, hf_out = useful["kiln"], useful.get("hf", 0)
    assert len(set(useful.values())) == 1, f"useful output tokens differ: {useful}"
    kiln_s, hf_s = statistics.median(times["kiln"]), statistics.median(times["hf"]) if hf is not None else None

    params = sum(p.numel() for p in llm.llm_engine.model.parameters())
    print(header(device, dtype))
    print(f"model {'random Llama' if args.model is None else path}: hidden {config.hidden_size}, layers "
          f"{config.num_hidden_layers}, heads {config.num_attention_heads}, kv heads {config.num_key_value_heads}, "
          f"intermediate {config.intermediate_size}, vocab {config.vocab_size}, {params / 1e6:.2f}M params")
    print(f"requests {len(work)} | prompt tokens {prompt_tokens} (len {args.min_input}..{args.max_input}) | "
          f"useful output tokens kiln {kiln_out}, HF {hf_out} (len {args.min_output}..{args.max_output}) | "
          f"HF batch {args.hf_batch_size} | median of {args.repeats}")
    rows = [("kiln LLM.generate", kiln_s)] + ([(f"HF generate (bs={args.hf_batch_size})", hf_s)] if hf_s else [])
    if "kiln-transformers" in times:
        rows.insert(1, ("kiln, Transformers backend", statistics.median(times["kiln-transformers"])))
    if "kiln-quantized" in times:
        rows.insert(1, (f"kiln, {args.quantization}", statistics.median(times["kiln-quantized"])))
    print(f"{'':28}{'time s':>10}{'output tok/s':>16}{'total tok/s':>16}")
    for name, secs in rows:
        print(f"{name:28}{secs:10.2f}{kiln_out / secs:16.1f}{(prompt_tokens + kiln_out) / secs:16.1f}")
    if hf_s:
        print(f"{'ratio kiln/HF':28}{'':10}{hf_s / kiln_s:16.2f}{hf_s / kiln_s:16.2f}")
    if "kiln-transformers" in times:
        ratio = kiln_s / statistics.median(times["kiln-transformers"])
        print(f"{'ratio backend/native':28}{'':10}{ratio:16.2f}{ratio:16.2f}")
    if "kiln-quantized" in times:
        ratio = kiln_s / statistics.median(times["kiln-quantized"])
        print(f"{'speedup ' + args.quantization + '/bf16':28}{'':10}{ratio:16.2f}{ratio:16.2f}")
    if args.repeats > 1:
        print(runs(times))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
