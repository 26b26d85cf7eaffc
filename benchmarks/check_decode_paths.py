"""GPU sanity check: compiled (Triton + decode CUDA graphs) and eager give the same greedy tokens on a
tiny random Llama, also with sampling parameters that take the sampler's slower paths and with
int8 weight-only quantization against its own eager graph.

    python benchmarks/check_decode_paths.py
"""

from __future__ import annotations

import tempfile

from kiln import LLM, SamplingParams
from kiln.runtime.demo import build_checkpoint


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = build_checkpoint(tmp, "LlamaForCausalLM", initializer_range=0.02)
        prompts = [{"prompt_token_ids": list(range(10 + i, 40 + 3 * i))} for i in range(5)]
        plain = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
        edited = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, repetition_penalty=1.3, min_tokens=4)
        for name, kwargs in (("unquantized", {}), ("int8_weight_only", {"quantization": "int8_weight_only"})):
            for params in (plain, edited):
                runs = [[o.outputs[0].token_ids for o in LLM(path, dtype="float32", enforce_eager=eager, **kwargs)
                         .generate(prompts, params, use_tqdm=False)] for eager in (True, False)]
                same = sum(a == b for a, b in zip(*runs))
                print(f"{name:18} {'penalty' if params is edited else 'plain':8} compiled == eager for {same}/{len(prompts)} prompts")


if __name__ == "__main__":
    main()
