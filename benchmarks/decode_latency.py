"""Batch-1 decode against the memory roofline: kiln (compiled: Triton kernels + decode CUDA graphs)
and HF transformers `generate`, same model, same run, on the GPU.

The roofline of one decode step is reading every weight once: weight bytes / the measured
device-to-device copy bandwidth. The script prints the bandwidth, the weight bytes, the roofline,
kiln's time per token (from a 128-token prompt, 256 new tokens, the prefill's time subtracted) and
its fraction of the roofline, and HF's tokens/s. Model: the Llama-3.2-1B shape (random bf16
weights, built in a temp dir); --small for a quick check.

    python benchmarks/decode_latency.py
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import transformers
from transformers import AutoModelForCausalLM

from kiln import LLM, SamplingParams
from kiln.runtime.demo import build_checkpoint, train_tokenizer

LLAMA_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=8192, max_position_embeddings=2048, tie_word_embeddings=True, head_dim=64,
                initializer_range=0.02)


def copy_bandwidth(device) -> float:
    """Bytes read + written per second of a large device-to-device copy (median of 20)."""
    src = torch.randn(256 * 2**20, device=device)  # 1 GiB
    dst = torch.empty_like(src)
    times = []
    for _ in range(22):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() * src.element_size() / statistics.median(times[2:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    device = torch.device("cuda")
    shape = dict(LLAMA_1B)
    if args.small:
        shape.update(hidden_size=512, num_hidden_layers=4, intermediate_size=1024, num_attention_heads=8,
                     num_key_value_heads=2)
    tmp = tempfile.TemporaryDirectory(prefix="kiln-decode-")
    tokenizer = train_tokenizer()
    path = build_checkpoint(tmp.name, "LlamaForCausalLM", dtype="bfloat16", tokenizer=tokenizer,
                            vocab_size=128256 if not args.small else 32000, **shape)
    bandwidth = copy_bandwidth(device)

    llm = LLM(path, dtype="bfloat16", enforce_eager=False, max_num_seqs=8, max_model_len=1024,
              enable_prefix_caching=False)
    weight_bytes = sum(p.numel() * p.element_size() for p in llm.llm_engine.model.parameters())
    roofline = weight_bytes / bandwidth
    prompt = {"prompt_token_ids": list(range(100, 100 + args.prompt_len))}

    def timed(n: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)
        torch.cuda.synchronize()
        assert len(out[0].outputs[0].token_ids) == n
        return time.perf_counter() - t0

    timed(args.new_tokens)  # warm-up
    first = statistics.median(timed(1) for _ in range(args.repeats))
    full = statistics.median(timed(args.new_tokens) for _ in range(args.repeats))
    per_token = (full - first) / (args.new_tokens - 1)

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
    ids = torch.tensor([prompt["prompt_token_ids"]], device=device)

    @torch.inference_mode()
    def hf_run(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n, min_new_tokens=n,
                    pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    hf_run(8)
    hf_s = statistics.median(hf_run(args.new_tokens) for _ in range(max(1, args.repeats - 1)))

    print(f"device {torch.cuda.get_device_name(device)} | torch {torch.__version__} | transformers {transformers.__version__}")
    print(f"model Llama{'-small' if args.small else '-3.2-1B'} shape, bf16, {weight_bytes / 1e9:.3f} GB of weights | "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens, batch 1, median of {args.repeats}")
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s | roofline {roofline * 1e3:.3f} ms/token "
          f"({1 / roofline:.0f} tok/s)")
    print(f"{'':28}{'ms/token':>10}{'tok/s':>10}{'of roofline':>14}")
    print(f"{'kiln (compiled + graphs)':28}{per_token * 1e3:10.3f}{1 / per_token:10.1f}{roofline / per_token:14.1%}")
    hf_tok = hf_s / args.new_tokens
    print(f"{'HF generate (eager)':28}{hf_tok * 1e3:10.3f}{1 / hf_tok:10.1f}{roofline / hf_tok:14.1%}")
    print(f"kiln time to first token (prefill of {args.prompt_len}) {first * 1e3:.1f} ms")
    tmp.cleanup()


if __name__ == "__main__":
    main()
