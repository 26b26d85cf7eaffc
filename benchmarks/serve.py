"""Online serving: a request-rate sweep against a kiln server (or any OpenAI-compatible one).

Against --base-url when given (a running `kiln serve`, or another OpenAI-compatible server for a
side-by-side figure: run the script against each); otherwise the script starts `kiln serve` in a
subprocess on --model, or on a random Llama built in a temp dir with the shape arguments (as
benchmarks/throughput.py does), and stops it at the end.

Workload: per rate, --num-prompts fresh prompts (so that the prefix cache cannot serve one rate
from the last) of --input-len random token ids (drawn from the vocabulary minus the special ids
0..5), each asking for exactly --output-len tokens (greedy, `ignore_eos`).
For each rate in --request-rates (requests per second; "inf" sends them all at once) requests
arrive as a Poisson process (seeded), each streamed through the official `openai` client
(`AsyncOpenAI.completions.create(stream=True, stream_options={"include_usage": True})`):

* TTFT: from sending the request to its first chunk (the server sends one per step that
  produced tokens, with or without text),
* TPOT: (end - first chunk) / (output tokens - 1), per request,
* throughput: requests and output tokens per second over the rate's wall time.

Percentiles p50/p90/p99 of TTFT and TPOT per rate; one warm-up request first.

    python benchmarks/serve.py                                  # tiny model, sized for a small CPU
    python benchmarks/serve.py --base-url http://127.0.0.1:8000/v1 --num-prompts 200
    python benchmarks/serve.py --hidden-size 2048 --num-layers 16 --num-heads 16 --num-kv-heads 8 \\
        --intermediate-size 5632 --request-rates 4,16,64,inf --num-prompts 512
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

FIRST_ID = 6  # ids 0..5 are the demo tokenizer's special tokens


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", help="an OpenAI-compatible server's /v1 URL (default: start `kiln serve`)")
    p.add_argument("--api-key", default="EMPTY")
    p.add_argument("--served-model-name", help="the `model` to request (default: the server's first model)")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--request-rates", default="4,16,inf", help="comma-separated requests/s; inf: all at once")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, help="prompt ids are drawn below this (default: the model's vocabulary, "
                   "or 384 against --base-url)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take")
    # the model `kiln serve` runs when no --base-url is given
    p.add_argument("--model", help="a checkpoint for the server (default: a random Llama of the shape below)")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-heads", type=int, default=8)
    p.add_argument("--num-kv-heads", type=int, default=4)
    p.add_argument("--intermediate-size", type=int, default=688)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--server-args", default="", help="more `kiln serve` arguments, one string")
    args = p.parse_args()
    if args.output_len < 2:
        p.error("--output-len must be >= 2 (TPOT needs a decode step)")
    return args


def start_server(args, workdir: str) -> tuple[subprocess.Popen, str, str]:
    """`kiln serve` in a subprocess -> (process, its /v1 URL, the model path)."""
    model = args.model
    if model is None:
        import torch

        from kiln.runtime.demo import build_checkpoint

        dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if torch.cuda.is_available() else "float32")
        model = build_checkpoint(
            os.path.join(workdir, "model"), "LlamaForCausalLM", seed=args.seed, dtype=dtype,
            hidden_size=args.hidden_size, num_hidden_layers=args.num_layers, num_attention_heads=args.num_heads,
            num_key_value_heads=args.num_kv_heads, intermediate_size=args.intermediate_size,
            max_position_embeddings=max(512, args.input_len + args.output_len))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "kiln.runtime.cli", "serve", model, "--port", str(port), "--served-model-name",
           "bench", "--api-key", args.api_key, "--dtype", args.dtype, "--max-num-seqs", str(args.max_num_seqs),
           "--max-model-len", str(max(512, args.input_len + args.output_len)), "--log-level", "warning",
           *args.server_args.split()]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"kiln serve exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, f"{url}/v1", model
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit("kiln serve did not become healthy in 600 s")


async def one_request(client, model: str, prompt: list[int], args) -> tuple[float, float, float, int]:
    """-> (start, first chunk, end, output tokens), times from time.perf_counter."""
    start = time.perf_counter()
    first, tokens = None, None
    stream = await client.completions.create(
        model=model, prompt=prompt, max_tokens=args.output_len, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    async for chunk in stream:
        if first is None and chunk.choices:
            first = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    return start, first if first is not None else end, end, tokens or 0


async def sweep_rate(client, model: str, prompts: list[list[int]], rate: float, args) -> dict:
    rng = np.random.default_rng(args.seed)
    gaps = rng.exponential(1.0 / rate, len(prompts)) if rate != float("inf") else np.zeros(len(prompts))
    t0 = time.perf_counter()
    tasks = []
    for prompt, gap in zip(prompts, gaps):
        tasks.append(asyncio.ensure_future(one_request(client, model, prompt, args)))
        if gap:
            await asyncio.sleep(gap)
    results = await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    ttft = np.array([first - start for start, first, _, _ in results])
    tpot = np.array([(end - first) / (n - 1) for _, first, end, n in results if n > 1])
    out_tokens = sum(n for *_, n in results)
    short = sum(1 for *_, n in results if n != args.output_len)
    return {"rate": rate, "wall": wall, "req_s": len(results) / wall, "tok_s": out_tokens / wall,
            "ttft": np.percentile(ttft, [50, 90, 99]) * 1e3, "tpot": np.percentile(tpot, [50, 90, 99]) * 1e3,
            "short": short}


async def run(args, base_url: str, vocab: int) -> None:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key=args.api_key, max_retries=0, timeout=args.timeout)
    model = args.served_model_name or (await client.models.list()).data[0].id
    rng = random.Random(args.seed)
    def draw() -> list[list[int]]:
        return [[rng.randrange(FIRST_ID, vocab) for _ in range(args.input_len)] for _ in range(args.num_prompts)]

    await one_request(client, model, draw()[0], args)  # warm-up
    rates = [float(r) for r in args.request_rates.split(",")]
    print(f"server {base_url} | model {model} | {args.num_prompts} requests per rate | prompt {args.input_len} tokens | "
          f"output {args.output_len} tokens (greedy, EOS ignored)")
    print(f"{'rate req/s':>10}{'wall s':>8}{'req/s':>8}{'out tok/s':>11}   {'TTFT ms p50/p90/p99':>24}   "
          f"{'TPOT ms p50/p90/p99':>22}")
    for rate in rates:
        r = await sweep_rate(client, model, draw(), rate, args)
        ttft, tpot = "/".join(f"{x:.1f}" for x in r["ttft"]), "/".join(f"{x:.2f}" for x in r["tpot"])
        note = f"   ({r['short']} requests got fewer tokens)" if r["short"] else ""
        print(f"{rate:>10}{r['wall']:8.2f}{r['req_s']:8.2f}{r['tok_s']:11.1f}   {ttft:>24}   {tpot:>22}{note}")
    await client.close()


def main() -> None:
    args = parse_args()
    proc = None
    with tempfile.TemporaryDirectory(prefix="kiln-bench-serve-") as workdir:
        base_url, vocab = args.base_url, args.vocab_size or 384
        if base_url is None:
            proc, base_url, model = start_server(args, workdir)
            if args.vocab_size is None:
                from transformers import AutoConfig

                vocab = AutoConfig.from_pretrained(model).vocab_size
        try:
            asyncio.run(run(args, base_url, vocab))
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(30)


if __name__ == "__main__":
    main()
