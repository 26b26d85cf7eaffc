"""Cold start: time from a fresh process to the first generated token, without and then with
kiln's on-disk compile cache (the second start reuses the first's compiled graphs).

The checkpoint (Llama-3.2-1B shape, random bf16 weights) is built once beforehand and is not
timed. Each start is a new Python process that imports kiln, builds `LLM(path)` (compiled on CUDA:
trace, passes, Inductor, decode CUDA graphs) and generates one token from a 128-token prompt.

    python benchmarks/cold_start.py [--verbose] [--small] [--new-tokens N]

Each start's phase timings (the engine's log, ms since the process started) are printed; --verbose
adds where the start's main thread spent its time up to the first token, sampled every 20 ms (the
innermost kiln frame and the innermost frame; cProfile loses the outer frames while Dynamo traces).
--small: a 16-layer Llama of hidden size 128 in float32 (a CPU check of the compile path; on a CPU
the start compiles with Inductor's CPU backend, without CUDA graphs). --new-tokens: tokens the
first generate makes (default 1; more also times the first decode steps, which on a CPU is when
the one-token shape is first compiled).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

PROBE = """
import sys, time, json, logging, threading, collections, os, importlib.util
t0 = float(sys.argv[2])
logging.basicConfig(level=logging.INFO, format="%(relativeCreated)8.0f ms %(message)s")
logging.getLogger("kiln").setLevel(logging.INFO)
verbose = sys.argv[5] == "1"
samples = collections.Counter()  # (innermost kiln frame, innermost frame) -> samples of the main thread
main_id, done, PERIOD = threading.get_ident(), threading.Event(), 0.02
ours_dir = os.path.dirname(importlib.util.find_spec("kiln").origin) + os.sep  # (found, not imported)


def where(frame):
    leaf, ours = None, "(outside kiln)"
    while frame is not None:
        code = frame.f_code
        name = f"{os.path.basename(code.co_filename)}:{frame.f_lineno}({code.co_name})"
        leaf = leaf or name
        if code.co_filename.startswith(ours_dir) and ours == "(outside kiln)":
            ours = name
        frame = frame.f_back
    return ours, leaf


def sample():  # a sampling profiler: cProfile loses the outer frames while Dynamo traces
    while not done.wait(PERIOD):
        frame = sys._current_frames().get(main_id)
        if frame is not None:
            samples[where(frame)] += 1


if verbose:
    threading.Thread(target=sample, daemon=True).start()
from kiln import LLM, SamplingParams
t_import = time.time()
llm = LLM(sys.argv[1], enforce_eager=False, max_num_seqs=64, max_model_len=1024, **json.loads(sys.argv[3]))
t_built = time.time()
prompt, params = {"prompt_token_ids": list(range(100, 228))}, SamplingParams(max_tokens=int(sys.argv[4]), ignore_eos=True)
llm.generate(prompt, params, use_tqdm=False)
t_first = time.time()
done.set()
llm.generate(prompt, params, use_tqdm=False)
t_second = time.time()
by_ours = collections.Counter()
for (ours, _), n in samples.items():
    by_ours[ours] += n
for ours, n in by_ours.most_common(15):
    print(f"sampled {n * PERIOD:6.2f} s  {ours}", file=sys.stderr)
for (ours, leaf), n in samples.most_common(20):
    print(f"sampled {n * PERIOD:6.2f} s  {ours:<60} {leaf}", file=sys.stderr)
print(json.dumps({"import": t_import - t0, "built": t_built - t0, "first_token": t_first - t0,
                  "second_call": t_second - t_first}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--small", action="store_true")
    p.add_argument("--new-tokens", type=int, default=1)
    args = p.parse_args()
    verbose = args.verbose
    sys.path.insert(0, os.path.dirname(__file__))
    from decode_latency import LLAMA_1B

    from kiln.runtime.demo import build_checkpoint, train_tokenizer

    with tempfile.TemporaryDirectory(prefix="kiln-cold-") as tmp:
        if args.small:
            dtype, shape = "float32", dict(num_hidden_layers=16, hidden_size=128, intermediate_size=256,
                                           max_position_embeddings=1024)
            path = build_checkpoint(os.path.join(tmp, "model"), "LlamaForCausalLM", dtype=dtype, **shape)
        else:
            dtype = "bfloat16"
            path = build_checkpoint(os.path.join(tmp, "model"), "LlamaForCausalLM", dtype=dtype,
                                    tokenizer=train_tokenizer(), vocab_size=128256, **LLAMA_1B)
        env = {**os.environ, "KILN_CACHE_DIR": os.path.join(tmp, "cache")}
        rows = []
        for label in ("no compile cache", "compile cache warm"):
            out = subprocess.run([sys.executable, "-c", PROBE, path, str(time.time()), json.dumps({"dtype": dtype}),
                                  str(args.new_tokens), "1" if verbose else "0"], env=env, capture_output=True,
                                 text=True, timeout=900)
            if out.returncode != 0:
                sys.exit(out.stderr[-3000:])
            rows.append((label, json.loads(out.stdout.strip().splitlines()[-1])))
            # the engine's phase timings; with --verbose, where the start spent its time (sampled)
            print(f"--- {label}\n" + "\n".join(line for line in out.stderr.splitlines() if " ms kiln:" in line or (
                verbose and line.startswith("sampled"))), flush=True)
    import torch

    print(f"device {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'} | torch {torch.__version__}")
    print(f"{'16-layer Llama, hidden 128' if args.small else 'Llama-3.2-1B shape'}, {dtype}; a fresh process each "
          f"start, compiled; prompt 128 tokens, {args.new_tokens} new token(s)")
    print(f"{'':22}{'imports s':>10}{'LLM built s':>14}{'first token s':>16}{'2nd call s':>12}")
    for label, r in rows:
        print(f"{label:22}{r['import']:10.1f}{r['built']:14.1f}{r['first_token']:16.1f}{r['second_call']:12.3f}")


if __name__ == "__main__":
    main()
