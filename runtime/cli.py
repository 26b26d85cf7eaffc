"""The `kiln` command line: `kiln serve`, `kiln generate`, `kiln compile`, `kiln bench`, `kiln models`."""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys

DEMO_PROMPTS = ["Hello, my name is", "The capital of France is"]


def _model_or_demo(args) -> str | None:
    """The MODEL argument, or with --demo the demo checkpoint (built on first use); None, with a
    message, when neither or both were given."""
    if args.demo == (args.model is not None):
        print(f"kiln {args.command}: give a MODEL or --demo", file=sys.stderr)
        return None
    if not args.demo:
        return args.model
    from kiln.runtime.demo import demo_checkpoint

    model = demo_checkpoint()
    print(f"demo: a tiny random Llama with a locally trained tokenizer at {model} (its text is noise)")
    return model


def _generate(args) -> int:
    from kiln import LLM, SamplingParams

    model = _model_or_demo(args)
    if model is None:
        return 2
    prompts = list(args.prompt or [])
    if args.prompts_file:
        with open(args.prompts_file) as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    prompts = prompts or DEMO_PROMPTS
    llm = LLM(model, dtype=args.dtype, max_model_len=args.max_model_len, seed=args.seed,
              trust_remote_code=args.trust_remote_code, enforce_eager=args.enforce_eager, model_impl=args.model_impl)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed)
    for out in llm.generate(prompts, params):
        if args.json:
            print(json.dumps({"prompt": out.prompt, "text": out.outputs[0].text,
                              "token_ids": out.outputs[0].token_ids, "finish_reason": out.outputs[0].finish_reason}))
        else:
            print(f"{out.prompt!r} -> {out.outputs[0].text!r} ({out.outputs[0].finish_reason})")
    return 0


def _compile(args) -> int:
    """Build the model compiled, run one short forward so every graph is traced (on CUDA the
    decode graphs' capture traces them already), and with --dump-ir list the IR files written:
    the graph before the passes and after each one, per traced graph."""
    import time

    from kiln import LLM, SamplingParams
    from kiln.passes import PIPELINE

    model = _model_or_demo(args)
    if model is None:
        return 2
    options = {"backend": args.backend}
    if args.dump_ir:
        options["dump_ir"] = args.dump_ir
    if args.passes is not None:
        options["passes"] = [p for p in args.passes.split(",") if p]
        unknown = [p for p in options["passes"] if p not in PIPELINE]
        if unknown:
            raise ValueError(f"unknown passes {unknown}; known: {', '.join(PIPELINE)}")
    t0 = time.perf_counter()
    llm = LLM(model, dtype=args.dtype, max_model_len=args.max_model_len, trust_remote_code=args.trust_remote_code,
              enforce_eager=False, model_impl=args.model_impl, runner=args.runner, device=args.device,
              quantization=args.quantization, compilation_config=options)
    engine = llm.llm_engine
    ids = {"prompt_token_ids": list(range(1, min(9, engine.vocab_size)))}
    if engine.is_pooling:
        llm.encode(ids, use_tqdm=False)
    else:
        llm.generate(ids, SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)
    print(f"kiln compile: {engine.architecture} compiled ({args.backend}) and run in {time.perf_counter() - t0:.1f} s; "
          f"compile cache {os.environ.get('TORCHINDUCTOR_CACHE_DIR')}")
    if args.dump_ir:
        for folder in sorted(os.listdir(args.dump_ir)):
            print(f"  {os.path.join(args.dump_ir, folder)}: nodes, kiln ops after each step")
            for name in sorted(os.listdir(os.path.join(args.dump_ir, folder))):
                with open(os.path.join(args.dump_ir, folder, name)) as f:
                    nodes = [line for line in f if line.startswith("%")]
                print(f"    {name:34} {len(nodes):5} {sum(' = kiln.' in n for n in nodes):5}")
    llm.shutdown()
    return 0


def _serve(args) -> int:
    from kiln.runtime.async_engine import AsyncLLM
    from kiln.runtime.config import EngineConfig
    from kiln.runtime.server import serve

    model = _model_or_demo(args)
    if model is None:
        return 2
    config = EngineConfig(
        model=model, tokenizer=args.tokenizer, runner=args.runner, convert=args.convert, model_impl=args.model_impl,
        dtype=args.dtype,
        seed=args.seed, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_memory=args.kv_cache_memory,
        gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager,
        trust_remote_code=args.trust_remote_code, device=args.device, quantization=args.quantization,
        kv_cache_dtype=args.kv_cache_dtype, async_scheduling=args.async_scheduling,
        tensor_parallel_size=args.tensor_parallel_size, distributed_executor_backend=args.distributed_executor_backend,
        disable_custom_all_reduce=args.disable_custom_all_reduce)
    llm = AsyncLLM.from_config(config, max_pending_requests=args.max_pending_requests,
                               data_parallel_size=args.data_parallel_size)
    names = args.served_model_name or ["demo" if args.demo else model]
    serve(llm, names, host=args.host, port=args.port, api_key=args.api_key or os.environ.get("KILN_API_KEY"),
          max_body_bytes=args.max_body_bytes, model_path=model, log_level=args.log_level)
    return 0


BENCHMARKS = ("throughput", "latency", "serve")


def benchmark_path(name: str) -> str:
    """benchmarks/<name>.py: not a Python package, it sits in the repository root beside runtime/."""
    import kiln

    return os.path.join(os.path.dirname(os.path.abspath(kiln.__file__)), "benchmarks", f"{name}.py")


def _bench(args) -> int:
    path = benchmark_path(args.benchmark)
    if not os.path.isfile(path):
        print(f"kiln bench: {path} not found (the benchmarks ship with a source checkout, not with a wheel)",
              file=sys.stderr)
        return 1
    argv = sys.argv
    sys.argv = [path] + list(args.args)
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as e:  # argparse --help or an error inside the script
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
    return 0


def _models(args) -> int:
    """The native architectures, then (with --all) every class of the installed transformers that
    the Transformers backend can serve, by task."""
    from kiln.models import supported_architectures

    native = supported_architectures()
    for arch, entry in sorted(native.items()):
        print(f"{arch:40s} {','.join(entry.tasks):18s} native (kiln.models.{entry.module})")
    if not args.all:
        print("(--all also lists the architectures the installed transformers ships, served by the Transformers "
              "backend when their attention goes through its attention interface)")
        return 0
    from transformers.models.auto import modeling_auto as auto

    tasks = {"generate": auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "embed": auto.MODEL_MAPPING_NAMES,
             "classify,score": auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
             "token_classify": auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES}
    backend: dict[str, str] = {}
    for task, mapping in tasks.items():
        for names in mapping.values():
            for name in [names] if isinstance(names, str) else names:
                if name not in native:
                    backend.setdefault(name, task)
    for arch, task in sorted(backend.items()):
        print(f"{arch:40s} {task:18s} transformers backend")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kiln", description="Serve Hugging Face models with kiln")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text offline from prompts")
    gen.add_argument("model", nargs="?", help="a local checkpoint directory or a hub id")
    gen.add_argument("--demo", action="store_true", help="build a tiny local checkpoint and generate from it")
    gen.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    gen.add_argument("--prompts-file", help="a file with one prompt per line")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-p", type=float, default=0.95)
    gen.add_argument("--seed", type=int, default=1)
    gen.add_argument("--dtype", default="auto")
    gen.add_argument("--max-model-len", type=int)
    gen.add_argument("--trust-remote-code", action="store_true")
    gen.add_argument("--json", action="store_true", help="one JSON object per output line")
    gen.add_argument("--enforce-eager", action="store_true", default=None,
                     help="never compile (default: compile on CUDA, eager on CPU)")
    gen.add_argument("--model-impl", choices=["auto", "kiln", "transformers"], default="auto")
    gen.set_defaults(func=_generate)
    comp = sub.add_parser("compile", help="compile a model (trace, passes, codegen) and dump its IR per pass",
                          description="Compile MODEL as the engine does and run one short forward; with --dump-ir DIR "
                          "write each traced graph's IR before the passes and after each one "
                          "(DIR/graphN/00-input.txt, 01-merge_linears.txt, ...).")
    comp.add_argument("model", nargs="?", help="a local checkpoint directory or a hub id")
    comp.add_argument("--demo", action="store_true", help="compile the tiny local demo checkpoint")
    comp.add_argument("--dump-ir", metavar="DIR", help="write the IR before and after each pass here")
    comp.add_argument("--passes", help="comma-separated passes to run (default: all, in pipeline order)")
    comp.add_argument("--backend", default="inductor", choices=["inductor", "eager"],
                      help="codegen: Inductor (the default), or the passed FX graph run as is (no code generated)")
    comp.add_argument("--runner", choices=["generate", "pooling"], default="generate")
    comp.add_argument("--model-impl", default="auto", choices=["auto", "kiln", "transformers"])
    comp.add_argument("--dtype", default="auto")
    comp.add_argument("--device", default="auto")
    comp.add_argument("--max-model-len", type=int)
    comp.add_argument("--quantization", choices=["int8", "fp8", "int8_weight_only", "fp8_weight_only"])
    comp.add_argument("--trust-remote-code", action="store_true")
    comp.set_defaults(func=_compile)
    srv = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    srv.add_argument("model", nargs="?", help="a local checkpoint directory or a hub id")
    srv.add_argument("--demo", action="store_true", help="serve the tiny local demo checkpoint")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", help="clients must send 'Authorization: Bearer KEY' (default: $KILN_API_KEY; "
                     "unset: no key)")
    srv.add_argument("--served-model-name", nargs="+", help="the name(s) clients pass as `model` (default: MODEL)")
    srv.add_argument("--runner", choices=["generate", "pooling"], default="generate")
    srv.add_argument("--convert", default="auto", help="pooling: auto, embed, classify or reward")
    srv.add_argument("--model-impl", default="auto", choices=["auto", "kiln", "transformers"],
                     help="native kiln model, the Transformers backend, or auto (native when there is one)")
    srv.add_argument("--tokenizer")
    srv.add_argument("--dtype", default="auto")
    srv.add_argument("--max-model-len", type=int)
    srv.add_argument("--max-num-seqs", type=int, default=256)
    srv.add_argument("--max-num-batched-tokens", type=int)
    srv.add_argument("--kv-cache-memory", type=int, help="KV cache bytes (CPU; default 1 GiB)")
    srv.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    srv.add_argument("--device", default="auto")
    srv.add_argument("--seed", type=int, default=0)
    srv.add_argument("--enforce-eager", action="store_true", default=None,
                     help="run the reference ops, no compilation (default: eager on CPU, compiled on CUDA)")
    srv.add_argument("--trust-remote-code", action="store_true")
    srv.add_argument("--quantization", choices=["int8", "fp8", "int8_weight_only", "fp8_weight_only"],
                     help="quantize the weights at load (a pre-quantized checkpoint needs none)")
    srv.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "fp8_e4m3"])
    srv.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                     help="launch each decode step before reading back the previous one's tokens "
                          "(default: on for CUDA, off on CPU)")
    srv.add_argument("--tensor-parallel-size", type=int, default=1,
                     help="split the model over N ranks (worker processes; NCCL on CUDA, gloo on CPU)")
    srv.add_argument("--distributed-executor-backend", default="mp", choices=["mp", "ray"])
    srv.add_argument("--disable-custom-all-reduce", action="store_true",
                     help="keep every all-reduce on NCCL (default at TP=2: kiln's two-rank kernel over NVLink)")
    srv.add_argument("--max-body-bytes", type=int, default=16 << 20, help="larger request bodies get 413")
    srv.add_argument("--max-pending-requests", type=int, help="more requests in flight get 429 (default: no limit)")
    srv.add_argument("--data-parallel-size", type=int, default=1,
                     help="engine replicas, each its own process (one GPU each when there are several); requests go "
                     "to the replica with the fewest in flight")
    srv.add_argument("--log-level", default="info")
    srv.set_defaults(func=_serve)
    bench = sub.add_parser("bench", help="run a benchmark (benchmarks/<name>.py); arguments after the name go to it",
                           description="Run benchmarks/throughput.py, latency.py or serve.py; "
                           "`kiln bench NAME --help` lists a benchmark's options.")
    bench.add_argument("benchmark", choices=BENCHMARKS)
    bench.add_argument("args", nargs=argparse.REMAINDER)
    bench.set_defaults(func=_bench)
    models = sub.add_parser("models", help="list the supported architectures")
    models.add_argument("--all", action="store_true", help="include the Transformers backend's architectures")
    models.set_defaults(func=_models)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"kiln {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
