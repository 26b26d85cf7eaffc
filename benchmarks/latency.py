"""Batch-1 latency: kiln `LLM.generate` against Hugging Face transformers `generate`, one request at a time.

Both sides run the same Llama-shaped model (random weights, built in a temp dir with
`kiln.runtime.demo.build_checkpoint`, or an existing checkpoint via --model) in the same process,
on the same device, in the same dtype, on the same prompt of --input-len random token ids.

Each side generates greedily with EOS ignored, once with 1 output token and once with
--output-len tokens; per repeat:

* time to first token (TTFT) = the time of the 1-token call (prefill + one sample),
* time per output token (TPOT) = (time of the N-token call - TTFT) / (N - 1): the decode step,
* end to end = the time of the N-token call.

kiln's prefix caching is off, so every call prefills the whole prompt as HF does. One warm-up of
each call, then --repeats timed rounds alternating the sides (time.perf_counter, synchronised on
CUDA); medians are reported.

    python benchmarks/latency.py                       # tiny model, sized for a small CPU
    python benchmarks/latency.py --device cuda --hidden-size 2048 --num-layers 16 --num-heads 16 \\
        --num-kv-heads 8 --intermediate-size 5632
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
from common import device_and_dtype, header, random_llama  # noqa: E402

FIRST_ID = 6  # ids 0..5 are the demo tokenizer's special tokens


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-heads", type=int, default=8)
    p.add_argument("--num-kv-heads", type=int, default=4)
    p.add_argument("--intermediate-size", type=int, default=688)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--model", default=None, help="an existing checkpoint instead of a random one")
    args = p.parse_args()
    if args.output_len < 2:
        p.error("--output-len must be >= 2 (TPOT needs a decode step)")
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def main() -> None:
    args = parse_args()
    device, dtype = device_and_dtype(args.device, args.dtype)
    torch.manual_seed(args.seed)
    path, tmp = random_llama(args, dtype, args.input_len + args.output_len)
    config = AutoConfig.from_pretrained(path)
    rng = random.Random(args.seed)
    prompt = [rng.randrange(FIRST_ID, config.vocab_size) for _ in range(args.input_len)]

    llm = LLM(path, dtype=dtype, seed=args.seed, device=device.type, enable_prefix_caching=False, max_num_seqs=1)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    input_ids = torch.tensor([prompt], device=device)

    def kiln(n: int):
        def run():
            out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True),
                               use_tqdm=False)
            assert len(out[0].outputs[0].token_ids) == n
        return run

    def hf_generate(n: int):
        @torch.inference_mode()
        def run():
            out = hf.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                              max_new_tokens=n, min_new_tokens=n, pad_token_id=pad_id)
            assert out.shape[1] - input_ids.shape[1] == n
        return run

    sides = {"kiln": kiln, "hf": hf_generate}
    for make in sides.values():  # warm-up
        make(1)()
        make(args.output_len)()
    first = {name: [] for name in sides}
    full = {name: [] for name in sides}
    for _ in range(args.repeats):  # alternate, so that a noisy spell hits both sides
        for name, make in sides.items():
            first[name].append(timed(make(1), device))
            full[name].append(timed(make(args.output_len), device))

    def figures(name: str) -> tuple[float, float, float]:
        ttft, e2e = statistics.median(first[name]), statistics.median(full[name])
        return ttft, (e2e - ttft) / (args.output_len - 1), e2e

    params = sum(p.numel() for p in hf.parameters())
    print(header(device, dtype))
    print(f"model {'random Llama' if args.model is None else path}: hidden {config.hidden_size}, layers "
          f"{config.num_hidden_layers}, heads {config.num_attention_heads}, kv heads {config.num_key_value_heads}, "
          f"intermediate {config.intermediate_size}, vocab {config.vocab_size}, {params / 1e6:.2f}M params")
    print(f"batch 1 | prompt {args.input_len} tokens | output {args.output_len} tokens (greedy, EOS ignored) | "
          f"median of {args.repeats}")
    print(f"{'':22}{'TTFT ms':>10}{'TPOT ms':>10}{'decode tok/s':>14}{'end-to-end ms':>15}")
    rows = {"kiln LLM.generate": figures("kiln"), "HF generate": figures("hf")}
    for name, (ttft, tpot, e2e) in rows.items():
        print(f"{name:22}{ttft * 1e3:10.2f}{tpot * 1e3:10.2f}{1 / tpot:14.1f}{e2e * 1e3:15.1f}")
    (k_ttft, k_tpot, k_e2e), (h_ttft, h_tpot, h_e2e) = rows.values()
    print(f"{'ratio HF/kiln':22}{h_ttft / k_ttft:10.2f}{h_tpot / k_tpot:10.2f}{h_tpot / k_tpot:14.2f}{h_e2e / k_e2e:15.2f}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
