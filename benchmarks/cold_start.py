"""Cold start: time from a fresh process to the first generated token, without and then with
kiln's on-disk compile cache (the second start reuses the first's compiled graphs).

The checkpoint (Llama-3.2-1B shape, random bf16 weights) is built once beforehand and is not
timed. Each start is a new Python process that imports kiln, builds `LLM(path)` (compiled on CUDA:
trace, passes, Inductor, decode CUDA graphs) and generates one token from a 128-token prompt.

    python benchmarks/cold_start.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

PROBE = """
import sys, time, json
t0 = float(sys.argv[2])
from kiln import LLM, SamplingParams
llm = LLM(sys.argv[1], dtype="bfloat16", max_num_seqs=64, max_model_len=1024)
t_built = time.time()
llm.generate({"prompt_token_ids": list(range(100, 228))}, SamplingParams(max_tokens=1), use_tqdm=False)
print(json.dumps({"built": t_built - t0, "first_token": time.time() - t0}))
"""


def main() -> None:
    sys.path.insert(0, os.path.dirname(__file__))
    from decode_latency import LLAMA_1B

    from kiln.runtime.demo import build_checkpoint, train_tokenizer

    with tempfile.TemporaryDirectory(prefix="kiln-cold-") as tmp:
        path = build_checkpoint(os.path.join(tmp, "model"), "LlamaForCausalLM", dtype="bfloat16",
                                tokenizer=train_tokenizer(), vocab_size=128256, **LLAMA_1B)
        env = {**os.environ, "KILN_CACHE_DIR": os.path.join(tmp, "cache")}
        rows = []
        for label in ("no compile cache", "compile cache warm"):
            out = subprocess.run([sys.executable, "-c", PROBE, path, str(time.time())], env=env, capture_output=True,
                                 text=True, timeout=900)
            if out.returncode != 0:
                sys.exit(out.stderr[-3000:])
            rows.append((label, json.loads(out.stdout.strip().splitlines()[-1])))
    import torch

    print(f"device {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'} | torch {torch.__version__}")
    print("Llama-3.2-1B shape, bf16; a fresh process each start; prompt 128 tokens, 1 new token")
    print(f"{'':22}{'LLM built s':>14}{'first token s':>16}")
    for label, r in rows:
        print(f"{label:22}{r['built']:14.1f}{r['first_token']:16.1f}")


if __name__ == "__main__":
    main()
