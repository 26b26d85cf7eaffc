"""Cold start: time from a fresh process to the first generated token, without and then with
kiln's on-disk compile cache (the second start reuses the first's compiled graphs).

The checkpoint (Llama-3.2-1B shape, random bf16 weights) is built once beforehand and is not
timed. Each start is a new Python process that imports kiln, builds `LLM(path)` (compiled on CUDA:
trace, passes, Inductor, decode CUDA graphs) and generates one token from a 128-token prompt.

    python benchmarks/cold_start.py [--verbose] [--imports] [--bytecode-cache] [--small] [--new-tokens N]

Each start's phase timings (the engine's log, ms since the process started) are printed; --verbose
adds where the start's main thread spent its time up to the first token, sampled every 20 ms: by what
it was doing (importing a package's modules, Dynamo, Inductor, Triton, CUDA graph capture, kiln's own
code), by the engine's phase (its innermost line in engine.py or llm.py), and the innermost frames.
(cProfile loses the outer frames while Dynamo traces.)
--small: a 16-layer Llama of hidden size 128 in float32 (a CPU check of the compile path; on a CPU
the start compiles with Inductor's CPU backend, without CUDA graphs). --new-tokens: tokens the
first generate makes (default 1; more also times the first decode steps, which on a CPU is when
the one-token shape is first compiled). --imports: each start under `python -X importtime`, its
imported packages by time with the chain that first imported each. --bytecode-cache: two more starts
with a Python bytecode cache of their own: a machine that sets PYTHONDONTWRITEBYTECODE and ships no
.pyc (the lent GPU machines do) compiles every module a start imports, about 4500, in every start.
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
verbose = sys.argv[5] == "1"
logging.getLogger("kiln").setLevel(logging.DEBUG if verbose else logging.INFO)
samples = collections.Counter()  # (engine phase, kind, innermost frame) -> samples of the main thread
main_id, done, PERIOD = threading.get_ident(), threading.Event(), 0.02
ours_dir = os.path.dirname(importlib.util.find_spec("kiln").origin) + os.sep  # (found, not imported)


# what a sample was doing, by the libraries on its stack (the first that matches, innermost out)
KINDS = [("triton", "triton" + os.sep), ("inductor", os.path.join("torch", "_inductor")),
         ("dynamo", os.path.join("torch", "_dynamo")), ("fx / aot", os.path.join("torch", "fx")),
         ("fx / aot", os.path.join("torch", "_functorch")), ("cuda graph", os.path.join("torch", "cuda")),
         ("safetensors", "safetensors" + os.sep), ("tokenizer", "tokenizers"), ("transformers", "transformers" + os.sep)]


def where(frame):  # -> (the engine's phase: its innermost line in engine.py or llm.py; the kind; the innermost frame)
    # (importing wins over the library: a module's first import reads and runs its files)
    leaf = phase = kind = importing = None
    while frame is not None:
        code = frame.f_code
        name = f"{os.path.basename(code.co_filename)}:{frame.f_lineno}({code.co_name})"
        leaf = leaf or name
        if code.co_name == "<module>" and importing is None and frame.f_globals.get("__name__") != "__main__":
            importing = frame.f_globals.get("__name__", "?").split(".")[0]
        if phase is None and code.co_filename.startswith(ours_dir) and os.path.basename(code.co_filename) in (
                "engine.py", "llm.py"):
            phase = name
        if kind is None:
            kind = next((k for k, marker in KINDS if marker in code.co_filename), None)
            if kind is None and code.co_filename.startswith(ours_dir):
                kind = "kiln " + os.path.relpath(code.co_filename, ours_dir)
        frame = frame.f_back
    if importing is not None:
        kind = f"importing {importing}"
    return phase or "(before the engine)", kind or "(other)", leaf


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
by_kind, by_phase = collections.Counter(), collections.Counter()
for (phase, kind, _), n in samples.items():
    by_kind[kind] += n
    by_phase[phase, kind] += n
for kind, n in by_kind.most_common(15):
    print(f"sampled {n * PERIOD:6.2f} s  {kind}", file=sys.stderr)
for (phase, kind), n in by_phase.most_common(20):
    print(f"sampled {n * PERIOD:6.2f} s  {phase:<40} {kind}", file=sys.stderr)
for (phase, kind, leaf), n in samples.most_common(10):
    print(f"sampled {n * PERIOD:6.2f} s  {phase:<40} {kind:<28} {leaf}", file=sys.stderr)
print(json.dumps({"import": t_import - t0, "built": t_built - t0, "first_token": t_first - t0,
                  "second_call": t_second - t_first}))
"""


def import_report(lines: list[str], top: int = 20) -> str:
    """`python -X importtime`'s lines -> the top-level packages by the time their own modules took, each with
    the chain of modules through which it was first imported (children are printed before their parent,
    one indent deeper)."""
    rows = []  # (depth, module, own microseconds)
    for line in lines:
        if line.startswith("import time:") and "[us]" not in line:
            head, _, name = line.split("|")
            own = int(head.split(":")[1])
            rows.append(((len(name) - len(name.lstrip()) - 1) // 2, name.strip(), own))
    own_by_package, first_chain = {}, {}
    for i, (depth, name, own) in enumerate(rows):
        package = name.split(".")[0]
        own_by_package[package] = own_by_package.get(package, 0) + own
        if package not in first_chain:
            chain, want = [], depth - 1
            for d, parent, _ in rows[i + 1:]:
                if d == want:
                    chain.append(parent)
                    want -= 1
                if want < 0:
                    break
            first_chain[package] = [name, *chain]
    report = [f"imports: {len(rows)} modules, {sum(own_by_package.values()) / 1e6:.2f} s in their own code"]
    for package, own in sorted(own_by_package.items(), key=lambda kv: -kv[1])[:top]:
        report.append(f"imports {own / 1e6:6.2f} s  {package:<20} first by {' <- '.join(first_chain[package][:6])}")
    return "\n".join(report)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--small", action="store_true")
    p.add_argument("--new-tokens", type=int, default=1)
    p.add_argument("--bytecode-cache", action="store_true", help="two more starts with Python's bytecode cache "
                   "(PYTHONPYCACHEPREFIX in the run's folder, PYTHONDONTWRITEBYTECODE cleared), as an install "
                   "whose packages were compiled has")
    p.add_argument("--imports", action="store_true", help="run each start under python -X importtime and print "
                   "the packages it imported, by time, with the chain that first imported each")
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
        starts = [("no compile cache", env), ("compile cache warm", env)]
        if args.bytecode_cache:  # the same two starts again, with their own compile cache and a bytecode cache
            env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
            env.update(KILN_CACHE_DIR=os.path.join(tmp, "cache2"), PYTHONPYCACHEPREFIX=os.path.join(tmp, "pycache"))
            starts += [("no compile cache, bytecode cache", env), ("compile and bytecode caches warm", env)]
        rows, importtime = [], ["-X", "importtime"] if args.imports else []
        for label, env in starts:
            out = subprocess.run([sys.executable, *importtime, "-c", PROBE, path, str(time.time()),
                                  json.dumps({"dtype": dtype}), str(args.new_tokens), "1" if verbose else "0"],
                                 env=env, capture_output=True, text=True, timeout=900)
            if out.returncode != 0:
                sys.exit(out.stderr[-3000:])
            rows.append((label, json.loads(out.stdout.strip().splitlines()[-1])))
            # the engine's phase timings; with --verbose, where the start spent its time (sampled)
            print(f"--- {label}\n" + "\n".join(line for line in out.stderr.splitlines() if " ms kiln:" in line or (
                verbose and line.startswith("sampled"))), flush=True)
            if args.imports:
                print(import_report(out.stderr.splitlines()), flush=True)
    import torch

    print(f"device {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'} | torch {torch.__version__}")
    print(f"{'16-layer Llama, hidden 128' if args.small else 'Llama-3.2-1B shape'}, {dtype}; a fresh process each "
          f"start, compiled; prompt 128 tokens, {args.new_tokens} new token(s)")
    print("python bytecode: " + ("not written (PYTHONDONTWRITEBYTECODE), so a start without a bytecode cache "
                                 "compiles every module it imports" if sys.flags.dont_write_bytecode else "written"))
    print(f"{'':34}{'imports s':>10}{'LLM built s':>14}{'first token s':>16}{'2nd call s':>12}")
    for label, r in rows:
        print(f"{label:34}{r['import']:10.1f}{r['built']:14.1f}{r['first_token']:16.1f}{r['second_call']:12.3f}")


if __name__ == "__main__":
    main()
