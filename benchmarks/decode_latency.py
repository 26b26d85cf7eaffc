"""Batch-1 decode against the memory roofline: kiln (compiled: Triton kernels + decode CUDA graphs)
and HF transformers `generate`, same model, same run, on the GPU.

The roofline of one decode step is reading every weight once: weight bytes / the measured
device-to-device copy bandwidth (measured before and after the runs; the higher). The script prints
the bandwidth, the weight bytes, the roofline,
kiln's time per token (from a 128-token prompt, 256 new tokens, the prefill's time subtracted) and
its fraction of the roofline, and HF's tokens/s. Model: the Llama-3.2-1B shape (random bf16
weights, built in a temp dir); --small for a quick check.

On a Hopper GPU the one-row linears (and logits) run kiln's Triton gemv, chained to the other
kernels by programmatic dependent launch; `--cublas` adds a bf16 row with them on cuBLAS
(`compilation_config={"float_gemv": False}`), and `--compare-pdl` adds the bf16 rows again with
kiln's kernels launched without PDL (`{"pdl": False}`). Every row runs with async scheduling (the
engine's default on CUDA: the host's work overlapped with the device's) unless it says otherwise;
`--sync-scheduling` adds a bf16 row with the steps in turn; `--compare-attention`
adds async bf16 rows with the decode attention's splits merged by the kernel itself and by a second
launch (`decode_attention.MERGE_IN_KERNEL`); `--compare-fp8-conversion` an async fp8 weight-only row
whose gemv converts the weights by their bits (`quant_gemm.FP8_BY_BITS`); `--compare-gemv-tiles
"small=8x1024x8,long=8x1024x8;small=4x2048x4"` an async bf16 row per ';'-separated set of batch-1
gemv tilings (`quant_gemm._GEMV_TILES`: role=rows x K step x warps; roles small (o), long (down),
narrow (qkv), wide (gate_up), vocab (lm_head), deep (8B's K >= 4096 matrices); "8bit.ROLE" for the
8-bit weights' rows, in a row of that scheme: "int8_weight_only@8bit.wide=2x2048x4x4"; "ROLE+rope" for
the q/k/v gemv with the rotary epilogue alone; a 4th and 5th number: tiles a program and steps loaded
ahead), so a tiling is timed in the whole step, chained to its neighbours, rather than alone;
`--compare-rope-fusion` an async bf16 row without the fuse_linear_rope pass (rotary and the cache
write as a kernel of their own instead of in the q/k/v gemv's epilogue); `--compare-early-kv` an
async bf16 row whose decode attention loads every key and value after its PDL wait
(`decode_attention.EARLY_KV` off); `--compare-norm-at-end` an async bf16 row whose
norm gemvs read the row for its statistics before their product (`quant_gemm.NORM_AT_END` off);
`--compare-mlp-fusion` / `--compare-embedding-fusion` an async bf16 row without the fuse_mlp /
fuse_embedding pass;
`--compare-switches "decode_block_n=64;newest_row=0;decode_max_splits=4"` an async
bf16 row per ';'-separated set of module switches (a SCHEME@ prefix: a quantized row) (the names of the `switches` table in main(),
integer values), e.g. the decode attention's key tile (`decode_attention.DECODE_BLOCK_N`: 64 and 32
lost to the default 128 on an H100 in session 25), this step's token read as a masked tile
(`decode_attention.NEWEST_ROW` 0) or the splits' cap (`decode_attention.DECODE_MAX_SPLITS`);
`--bracket` runs the default row again after the others (the rows share one process, each engine
built after the last is deleted: the two default figures tell whether the order moves them).
`--rounds N` builds every row's engine first (the 1B's fit side by side), then times the rows N
times, interleaved, each round starting one row later, and reports each row's median: the same
default row once gave 1.133 ms/token first and 0.937 last in one call. Every row's timings are
printed in the order taken, with the GPU's SM clock range, temperature and power while they ran.
`--quantization int8_weight_only,fp8_weight_only` adds a row per scheme from the same run: each
against its own roofline, the bytes its compiled graphs actually read per token (8-bit weights and
their scales, and whatever stays bf16: norms, and the output projection unless
--quantize-lm-head), and its speedup over bf16.

    python benchmarks/decode_latency.py [--quantization int8_weight_only,fp8_weight_only]
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import tempfile
import time

import torch
import transformers
from transformers import AutoModelForCausalLM

from kiln import LLM, SamplingParams
from kiln.codegen.kernels import fused_mlp, quant_gemm
from kiln.passes import PIPELINE, fuse_mlp
from kiln.runtime import cuda_graphs, model_runner
from kiln.runtime.demo import build_checkpoint, train_tokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import GpuWatch, gpu_summary  # noqa: E402

# (the kernels package re-exports the launcher under the module's name)
decode_kernels = importlib.import_module("kiln.codegen.kernels.decode_attention")

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


def bytes_read_per_token(llm: LLM) -> int:
    """The bytes one decode step reads from weights: every constant of the compiled graphs (8-bit
    weights and scales) and every parameter they still read, except tables read a row at a time
    (embeddings); the output projection's weight when logits run uncompiled."""
    engine = llm.llm_engine
    graphs = list(engine.runner.forward.kiln_backend.graphs)
    tensors = {}

    def add(t: torch.Tensor) -> None:
        tensors[(t.data_ptr(), t.numel(), t.dtype)] = t.numel() * t.element_size()

    def as_table(node, user) -> bool:  # (the table of an embedding op, fused or not: its second argument)
        return str(user.target).startswith("kiln.embedding") and user.args[1] is node

    if hasattr(engine.runner.logits, "kiln_backend"):
        graphs += engine.runner.logits.kiln_backend.graphs
    else:
        model = engine.model
        add(model.lm_head.weight if hasattr(model, "lm_head") else model.model.embed_tokens.weight)
    for graph in graphs:
        for node in graph.graph.nodes:
            if node.op == "get_attr":
                add(getattr(graph.gm, node.target))
            elif graph.is_parameter(node) and any(not as_table(node, u) for u in node.users):
                add(graph.example_value(node))
    return sum(tensors.values())


def hf_seconds(path: str, prompt_ids: list[int], new_tokens: int, repeats: int, device) -> float:
    """HF generate's median seconds for `new_tokens` greedy tokens after the prompt, batch 1."""
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
    ids = torch.tensor([prompt_ids], device=device)

    @torch.inference_mode()
    def hf_run(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n, min_new_tokens=n,
                    pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    hf_run(8)
    return statistics.median(hf_run(new_tokens) for _ in range(max(1, repeats - 1)))


def gemv_tiles(spec: str) -> dict:
    try:
        return quant_gemm.parse_gemv_tiles(spec)
    except ValueError as e:
        raise SystemExit(f"--compare-gemv-tiles: {e}") from None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quantization", default="", help="comma-separated schemes to time after bf16")
    p.add_argument("--quantize-lm-head", action="store_true")
    p.add_argument("--cublas", action="store_true",
                   help="add a bf16 row whose batch-1 linears run cuBLAS instead of kiln's Triton gemv")
    p.add_argument("--compare-pdl", action="store_true",
                   help="add bf16 rows with programmatic dependent launch off (compilation_config pdl=False)")
    p.add_argument("--compare-attention", action="store_true",
                   help="add async bf16 rows with the attention's splits merged by the attention kernel and by a "
                        "second one")
    p.add_argument("--compare-fp8-conversion", action="store_true",
                   help="add an async fp8_weight_only row whose gemv reads e4m3 weights by their bits "
                        "(quant_gemm.FP8_BY_BITS)")
    p.add_argument("--compare-gemv-tiles", default="",
                   help="';'-separated sets of role=NxKxW[xTILES[xDEPTH]] gemv tilings, an async row each, bf16 "
                        "or SCHEME@SET for a quantization scheme's (see above)")
    p.add_argument("--compare-rope-fusion", action="store_true",
                   help="add an async bf16 row without the fuse_linear_rope pass")
    p.add_argument("--compare-embedding-fusion", action="store_true",
                   help="add an async bf16 row without the fuse_embedding pass (the embedding a launch of its own)")
    p.add_argument("--compare-mlp-fusion", action="store_true",
                   help="add an async bf16 row without the fuse_mlp pass (gate/up and down as two gemvs)")
    p.add_argument("--compare-mlp-8bit", action="store_true",
                   help="for each --quantization scheme, add a row whose 8-bit MLPs are one launch too "
                        "(fused_mlp.EIGHT_BIT, off: it lost in session 34)")
    p.add_argument("--compare-early-kv", action="store_true",
                   help="add an async bf16 row whose attention loads no key or value before its PDL wait")
    p.add_argument("--compare-norm-at-end", action="store_true",
                   help="add an async bf16 row whose norm gemvs read the row for its statistics first "
                        "(quant_gemm.NORM_AT_END off)")
    p.add_argument("--compare-switches", default="",
                   help="';'-separated sets of NAME=INT module switches (decode_block_n, newest_row, "
                        "decode_max_splits, ...): an async bf16 row each, or a quantized one with a SCHEME@ "
                        "prefix (int8_weight_only@mlp_8bit=1,mlp_rows=4)")
    p.add_argument("--bracket", action="store_true",
                   help="run the default bf16 row again after the others: an order effect between rows shows as a "
                        "difference between its two figures")
    p.add_argument("--rounds", type=int, default=1,
                   help="build every row's engine first, then time the rows this many times, interleaved (each round "
                        "starting one row later), and report each row's median and range")
    p.add_argument("--no-hf", action="store_true", help="skip HF generate")
    p.add_argument("--sync-scheduling", action="store_true",
                   help="add a bf16 row with the steps in turn (async_scheduling=False)")
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

    prompt = {"prompt_token_ids": list(range(100, 100 + args.prompt_len))}
    variants = [("bf16", {})] + ([("bf16 steps in turn", {"async_scheduling": False})] if args.sync_scheduling else [])
    variants += [("bf16 cuBLAS", {"float_gemv": False})] if args.cublas else []
    if args.compare_pdl:
        variants += [(f"{name}, no PDL", {**kw, "pdl": False}) for name, kw in list(variants)]
    if args.compare_attention:
        variants += [(f"async, merge {'in kernel' if here else 'kernel'}", {"async_scheduling": True,
                                                                             "merge_in_kernel": here})
                     for here in (True, False)]
    variants += [(scheme, {"quantization": scheme})
                 for scheme in filter(None, args.quantization.split(","))]
    if args.compare_mlp_8bit:
        variants += [(f"{scheme}, MLP one launch", {"quantization": scheme, "mlp_8bit": True})
                     for scheme in filter(None, args.quantization.split(","))]
    if args.compare_fp8_conversion:
        variants += [("fp8_weight_only, async, by bits", {"quantization": "fp8_weight_only", "async_scheduling": True,
                                                          "fp8_by_bits": True})]
    # the rows without one fusion pass: (asked, the pass, what stays apart)
    for asked, dropped, apart in ((args.compare_rope_fusion, "fuse_linear_rope", "rotary"),
                                  (args.compare_mlp_fusion, "fuse_mlp", "MLP"),
                                  (args.compare_embedding_fusion, "fuse_embedding", "embedding")):
        if asked:
            variants += [(f"async, {apart} apart", {"async_scheduling": True,
                                                    "passes": [p for p in PIPELINE if p != dropped]})]
    if args.compare_early_kv:
        variants += [("async, kv after the wait", {"async_scheduling": True, "early_kv": False})]
    if args.compare_norm_at_end:
        variants += [("async, norm statistics first", {"async_scheduling": True, "norm_at_end": False})]
    for spec in filter(None, args.compare_switches.split(";")):
        scheme, _, spec = spec.rpartition("@")
        variants += [(f"{scheme or 'async'}, {spec}", {"async_scheduling": True,
                                                     **({"quantization": scheme} if scheme else {}),
                                                     **{k: int(v) for k, v in (kv.split("=") for kv in spec.split(","))}})]
    for spec in filter(None, args.compare_gemv_tiles.split(";")):
        scheme, _, tiles = spec.rpartition("@")
        variants += [(f"{scheme or 'async'}, tiles {tiles}", {"async_scheduling": True, "gemv_tiles": gemv_tiles(tiles),
                                                              **({"quantization": scheme} if scheme else {})})]
    if args.bracket and len(variants) > 1:
        variants += [("bf16, again last", {})]
    default_tiles = dict(quant_gemm._GEMV_TILES)
    # a row's key -> the module switch it sets (read while the graphs capture), and its value in the others
    switches = {key: (module, name, getattr(module, name)) for key, module, name in (
        ("merge_in_kernel", decode_kernels, "MERGE_IN_KERNEL"), ("early_kv", decode_kernels, "EARLY_KV"),
        ("decode_block_n", decode_kernels, "DECODE_BLOCK_N"),
        ("decode_max_splits", decode_kernels, "DECODE_MAX_SPLITS"),
        ("newest_row", decode_kernels, "NEWEST_ROW"), ("fp8_by_bits", quant_gemm, "FP8_BY_BITS"),
        ("norm_at_end", quant_gemm, "NORM_AT_END"), ("unpack_in_graph", cuda_graphs, "UNPACK_IN_GRAPH"),
        ("readback_stream", model_runner, "READBACK_STREAM"), ("token_buffers", cuda_graphs, "TOKEN_BUFFERS"),
        ("mlp_rows", fused_mlp, "ROWS"), ("mlp_tiles", fused_mlp, "TILES"), ("mlp_warps", fused_mlp, "NUM_WARPS"),
        ("mlp_depth", fused_mlp, "DEPTH"), ("mlp_8bit", fused_mlp, "EIGHT_BIT"),
        ("mlp_final_norm", fuse_mlp, "FINAL_NORM"))}

    def configure(kwargs: dict) -> dict:
        """Set a row's module switches and gemv tiles (the others' defaults); its LLM keyword arguments."""
        kwargs = dict(kwargs)
        quant_gemm._GEMV_TILES.clear()
        quant_gemm._GEMV_TILES.update(default_tiles)
        quant_gemm._GEMV_TILES.update(kwargs.pop("gemv_tiles", {}))
        for key, (module, switch, default) in switches.items():
            setattr(module, switch, kwargs.pop(key, default))
        options = {"quantize_lm_head": args.quantize_lm_head,
                   **{key: kwargs.pop(key) for key in ("float_gemv", "pdl", "passes") if key in kwargs}}
        return dict(kwargs, compilation_config=options)

    def timed(llm, n: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)
        torch.cuda.synchronize()
        assert len(out[0].outputs[0].token_ids) == n
        return time.perf_counter() - t0

    def measure(name: str, llm) -> None:
        """One timing of a row: (seconds per decoded token, time to first token) joins its rounds."""
        with GpuWatch() as watch:
            first = statistics.median(timed(llm, 1) for _ in range(args.repeats))
            full = statistics.median(timed(llm, args.new_tokens) for _ in range(args.repeats))
        rounds.setdefault(name, []).append(((full - first) / (args.new_tokens - 1), first))
        clocks.setdefault(name, []).extend(watch.samples)

    rounds: dict[str, list[tuple[float, float]]] = {}
    clocks: dict[str, list] = {}
    engines, weight_read = {}, {}
    for name, kwargs in variants:
        llm = LLM(path, dtype="bfloat16", enforce_eager=False, max_num_seqs=8, max_model_len=1024,
                  enable_prefix_caching=False, **configure(kwargs))
        timed(llm, args.new_tokens)  # warm-up (the graphs capture here, under this row's switches)
        weight_read[name] = bytes_read_per_token(llm)
        if args.rounds > 1:
            engines[name] = llm
            continue
        measure(name, llm)
        del llm
        torch.cuda.empty_cache()
    for r in range(args.rounds if engines else 0):  # each round starts one row later
        for name, kwargs in variants[r % len(variants):] + variants[:r % len(variants)]:
            configure(kwargs)
            measure(name, engines[name])
    results = {}  # row -> (bytes read per token, seconds per token, time to first token): the medians
    for name, _ in variants:
        per_token, first = zip(*rounds[name])
        results[name] = (weight_read[name], statistics.median(per_token), statistics.median(first))
    # Measured again after the runs, and the higher kept: the roofline is the most the device can
    # move (one call measured 2.58 TB/s at its start where the calls around it measured 2.90-2.97,
    # which would have flattered every fraction by 11%).
    bandwidths = (bandwidth, copy_bandwidth(device))
    bandwidth = max(bandwidths)
    weight_bytes, per_token, first = results["bf16"]
    roofline = weight_bytes / bandwidth

    hf_s = None if args.no_hf else hf_seconds(path, prompt["prompt_token_ids"], args.new_tokens, args.repeats, device)

    print(f"device {torch.cuda.get_device_name(device)} | torch {torch.__version__} | transformers {transformers.__version__}")
    print(f"model Llama{'-small' if args.small else '-3.2-1B'} shape, bf16, {weight_bytes / 1e9:.3f} GB of weights | "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens, batch 1, median of {args.repeats}")
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s (before the runs {bandwidths[0] / 1e12:.2f}, after "
          f"{bandwidths[1] / 1e12:.2f}; the higher) | roofline {roofline * 1e3:.3f} ms/token ({1 / roofline:.0f} tok/s)")
    print(f"{'':28}{'GB read':>9}{'roofline ms':>13}{'ms/token':>10}{'tok/s':>10}{'of roofline':>13}{'vs bf16':>9}")
    for name, (read, secs, _) in results.items():
        label = "kiln bf16 (compiled + graphs)" if name == "bf16" else f"kiln {name}"
        print(f"{label:28}{read / 1e9:9.3f}{read / bandwidth * 1e3:13.3f}{secs * 1e3:10.3f}{1 / secs:10.1f}"
              f"{read / bandwidth / secs:13.1%}{per_token / secs:9.2f}")
    if len(results) > 1:
        print(f"lm_head {'quantized' if args.quantize_lm_head else 'kept in bf16'} in the quantized rows")
    for name, timings in rounds.items():  # each row's timings (in the order taken) and the GPU's state meanwhile
        print(f"{name}: ms/token {' '.join(f'{t * 1e3:.3f}' for t, _ in timings)} | {gpu_summary(clocks[name])}")
    if hf_s is not None:
        hf_tok = hf_s / args.new_tokens
        print(f"{'HF generate (eager)':28}{weight_bytes / 1e9:9.3f}{roofline * 1e3:13.3f}{hf_tok * 1e3:10.3f}"
              f"{1 / hf_tok:10.1f}{roofline / hf_tok:13.1%}")
    print(f"kiln time to first token (prefill of {args.prompt_len}) {first * 1e3:.1f} ms")
    tmp.cleanup()


if __name__ == "__main__":
    main()
