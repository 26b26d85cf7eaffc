"""Where `LLM.embed` spends its time on a BERT-base shape: host (cProfile, by own time) and device
(torch.profiler, top CUDA kernels). A diagnostic companion to embed.py, not a comparison."""

from __future__ import annotations

import cProfile
import pstats
import random
import sys
import tempfile

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from embed import WORDS, bert_base_path  # noqa: E402

from kiln import LLM  # noqa: E402


def main() -> None:
    path = bert_base_path(tempfile.mkdtemp(prefix="kiln-prof-"))
    llm = LLM(path, runner="pooling", dtype="bfloat16", max_num_seqs=1024, max_num_batched_tokens=32768)
    rng = random.Random(0)
    sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 96))) for _ in range(2048)]
    llm.embed(sentences, use_tqdm=False)
    profile = cProfile.Profile()
    profile.enable()
    llm.embed(sentences, use_tqdm=False)
    torch.cuda.synchronize()
    profile.disable()
    pstats.Stats(profile).sort_stats("tottime").print_stats(18)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]) as prof:
        llm.embed(sentences, use_tqdm=False)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
