"""The `kiln` command line: `kiln generate`, `kiln models`."""

from __future__ import annotations

import argparse
import json
import sys

DEMO_PROMPTS = ["Hello, my name is", "The capital of France is"]


def _generate(args) -> int:
    from kiln import LLM, SamplingParams

    if args.demo == (args.model is not None):
        print("kiln generate: give a MODEL or --demo", file=sys.stderr)
        return 2
    model = args.model
    if args.demo:
        from kiln.runtime.demo import demo_checkpoint

        model = demo_checkpoint()
        print(f"demo: a tiny random Llama with a locally trained tokenizer at {model} (its text is noise)")
    prompts = list(args.prompt or [])
    if args.prompts_file:
        with open(args.prompts_file) as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    prompts = prompts or DEMO_PROMPTS
    llm = LLM(model, dtype=args.dtype, max_model_len=args.max_model_len, seed=args.seed,
              trust_remote_code=args.trust_remote_code, enforce_eager=True)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed)
    for out in llm.generate(prompts, params):
        if args.json:
            print(json.dumps({"prompt": out.prompt, "text": out.outputs[0].text,
                              "token_ids": out.outputs[0].token_ids, "finish_reason": out.outputs[0].finish_reason}))
        else:
            print(f"{out.prompt!r} -> {out.outputs[0].text!r} ({out.outputs[0].finish_reason})")
    return 0


def _models(args) -> int:
    from kiln.models import supported_architectures

    for arch, entry in sorted(supported_architectures().items()):
        print(f"{arch:32s} {','.join(entry.tasks):12s} native (kiln.models.{entry.module})")
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
    gen.set_defaults(func=_generate)
    models = sub.add_parser("models", help="list the supported architectures")
    models.set_defaults(func=_models)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"kiln {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
