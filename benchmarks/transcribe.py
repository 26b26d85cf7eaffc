"""Transcription speed: kiln `LLM.generate` on Whisper against HF `WhisperForConditionalGeneration.generate`
on the same clips, same model, same process, same device: the real-time factor (seconds of audio
transcribed per wall-clock second) and the ratio.

Model: a whisper-small shape (d_model 768, 12 encoder and 12 decoder layers, 12 heads, FFN 3072,
vocabulary 51865) with random weights and a locally trained tokenizer; or --tiny for a CPU-sized
one. Workload: --num-clips synthetic clips of 5..30 s, each decoded greedily for exactly
--new-tokens tokens (EOS ignored on both sides). HF runs batches of --hf-batch-size; kiln takes
all clips in one call and batches encoder and decoder steps itself.

    python benchmarks/transcribe.py --tiny            # CPU
    python benchmarks/transcribe.py --num-clips 64    # GPU, whisper-small shape
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

from kiln import LLM, SamplingParams
from kiln.runtime.demo import build_whisper_checkpoint

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import header, runs  # noqa: E402

PROMPT = "<|startoftranscript|><|en|><|transcribe|><|notimestamps|>"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a tiny model for CPU runs")
    p.add_argument("--num-clips", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--hf-batch-size", type=int, default=16)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    shape = {} if args.tiny else dict(vocab_size=51865, d_model=768, encoder_layers=12, decoder_layers=12,
                                      encoder_attention_heads=12, decoder_attention_heads=12, encoder_ffn_dim=3072,
                                      decoder_ffn_dim=3072, max_target_positions=448, init_std=0.02)
    tmp = tempfile.TemporaryDirectory(prefix="kiln-whisper-")
    path = build_whisper_checkpoint(tmp.name, seed=args.seed, **shape)
    rng = np.random.default_rng(args.seed)
    clips = []
    for _ in range(args.num_clips):
        t = np.arange(int(16000 * rng.uniform(5, 30))) / 16000
        clips.append((0.3 * np.sin(2 * np.pi * rng.uniform(100, 1000) * t) + 0.05 * rng.standard_normal(len(t))).astype(np.float32))
    audio_seconds = sum(len(c) for c in clips) / 16000

    llm = LLM(path, dtype=dtype, max_num_seqs=max(args.num_clips, 1))
    prompt_ids = llm.get_tokenizer().convert_tokens_to_ids(
        ["<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"])
    hf = WhisperForConditionalGeneration.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    fe = WhisperFeatureExtractor.from_pretrained(path)
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)

    def run_kiln():
        outs = llm.generate([{"prompt": PROMPT, "multi_modal_data": {"audio": (c, 16000)}} for c in clips], params,
                            use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == args.new_tokens for o in outs)

    @torch.inference_mode()
    def run_hf():
        for i in range(0, len(clips), args.hf_batch_size):
            batch = clips[i:i + args.hf_batch_size]
            features = fe(batch, sampling_rate=16000, return_tensors="pt").input_features.to(device, getattr(torch, dtype))
            out = hf.generate(features, decoder_input_ids=torch.tensor([prompt_ids] * len(batch), device=device),
                              max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
            assert out.shape[1] >= args.new_tokens

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    sides, times = {"kiln": run_kiln, "hf": run_hf}, {"kiln": [], "hf": []}
    for run in sides.values():
        run()  # warm-up
    for _ in range(args.repeats):
        for name, run in sides.items():
            sync()
            t0 = time.perf_counter()
            run()
            sync()
            times[name].append(time.perf_counter() - t0)
    kiln_s, hf_s = statistics.median(times["kiln"]), statistics.median(times["hf"])
    print(header(device, dtype))
    print(f"model {'tiny' if args.tiny else 'whisper-small shape'} (random weights) | clips {len(clips)} "
          f"({audio_seconds:.0f} s of audio) | {args.new_tokens} tokens each | HF batch {args.hf_batch_size} | "
          f"median of {args.repeats}")
    print(f"{'':30}{'time s':>10}{'real-time factor':>18}")
    print(f"{'kiln LLM.generate':30}{kiln_s:10.2f}{audio_seconds / kiln_s:18.1f}")
    print(f"{'HF generate':30}{hf_s:10.2f}{audio_seconds / hf_s:18.1f}")
    print(f"{'ratio kiln/HF':30}{'':10}{hf_s / kiln_s:18.2f}")
    print(runs(times, 2))
    tmp.cleanup()


if __name__ == "__main__":
    main()
