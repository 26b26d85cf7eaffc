"""GPU sanity check: compiled (Triton + decode CUDA graphs) and eager give the same greedy tokens on a
tiny random Llama, also with sampling parameters that take the sampler's slower paths and with
int8 weight-only quantization against its own eager graph; then, in bfloat16, the compiled path
with `float_gemv` (Triton gemv for one-row linears) against the compiled path with cuBLAS at batch 1
(bfloat16 sums in another order may flip a near-tie: the count is a report, the kernel tests are
the check), and with rotary in the q/k/v gemv's epilogue against the rotary kernel apart (the same
roundings, the gemv's sums tiled differently: the same tokens bar a near-tie), and with the MLP as one launch (fuse_mlp) against its two gemvs (likewise), and with the embedding
gathered by the first gemv (fuse_embedding) against the embedding apart (the same bits); and async scheduling against steps in turn (float32: the
same tokens).

    python benchmarks/check_decode_paths.py
"""

from __future__ import annotations

import os
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
        bf16 = build_checkpoint(tmp + "/bf16", "LlamaForCausalLM", initializer_range=0.02, dtype="bfloat16")
        runs = []
        for gemv in (False, True):
            llm = LLM(bf16, dtype="bfloat16", enforce_eager=False, compilation_config={"float_gemv": gemv})
            runs.append([llm.generate(p, plain, use_tqdm=False)[0].outputs[0].token_ids for p in prompts])
        same = sum(a == b for a, b in zip(*runs))
        print(f"bf16 batch 1: float_gemv == cuBLAS for {same}/{len(prompts)} prompts")
        # rotary + the cache write in the q/k/v gemv's epilogue (fuse_linear_rope) against the rotary
        # kernel after the gemv: the same roundings in the same order; only the gemv's sums may
        # differ in their last bit (its rows are tiled differently), so a near-tie may flip
        from kiln.passes import PIPELINE

        apart = LLM(bf16, dtype="bfloat16", enforce_eager=False,
                    compilation_config={"passes": [p for p in PIPELINE if p != "fuse_linear_rope"]})
        rotary_apart = [apart.generate(p, plain, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
        same = sum(a == b for a, b in zip(runs[1], rotary_apart))
        print(f"bf16 batch 1: fuse_linear_rope == rotary apart for {same}/{len(prompts)} prompts")
        # the MLP as one launch handing float32 partial sums to the next q/k/v gemv (fuse_mlp) against
        # the two gemvs: sums in another order (and atomics), so a near-tie may flip. Four layers: the
        # pass fuses the MLPs that a next layer reads, and only two or more of them (the IR dump shows it)
        deep = build_checkpoint(tmp + "/bf16-4", "LlamaForCausalLM", initializer_range=0.02, dtype="bfloat16",
                                num_hidden_layers=4)
        mlp_runs = []
        for passes in (PIPELINE, [p for p in PIPELINE if p != "fuse_mlp"]):
            llm = LLM(deep, dtype="bfloat16", enforce_eager=False,
                      compilation_config={"passes": passes, "dump_ir": tmp + f"/ir{len(mlp_runs)}"})
            mlp_runs.append([llm.generate(p, plain, use_tqdm=False)[0].outputs[0].token_ids for p in prompts])
        fused = sum(open(os.path.join(folder, name)).read().count("kiln.add_rms_norm_mlp(")
                    for folder, _, names in os.walk(tmp + "/ir0") for name in names if name.endswith("fuse_mlp.txt"))
        same = sum(a == b for a, b in zip(*mlp_runs))
        print(f"bf16 batch 1, 4 layers: fuse_mlp ({fused} MLPs fused over the graphs) == MLP apart for "
              f"{same}/{len(prompts)} prompts")
        # the embedding gathered by the first q/k/v gemv (fuse_embedding) against the embedding kernel
        # apart: the same row, the same gemv; the same bits, so the same tokens
        llm = LLM(deep, dtype="bfloat16", enforce_eager=False,
                  compilation_config={"passes": [p for p in PIPELINE if p != "fuse_embedding"]})
        embedding_apart = [llm.generate(p, plain, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
        fused = sum(open(os.path.join(folder, name)).read().count("kiln.embedding_rms_norm_linear_rope(")
                    for folder, _, names in os.walk(tmp + "/ir0") for name in names if name.endswith("fuse_mlp.txt"))
        same = sum(a == b for a, b in zip(mlp_runs[0], embedding_apart))
        print(f"bf16 batch 1, 4 layers: fuse_embedding ({fused} over the graphs) == embedding apart for "
              f"{same}/{len(prompts)} prompts")
        # async scheduling (step n+1 launched before step n's tokens are read; its input row filled
        # on the device) against steps in turn: the same tokens, one prompt at a time (the decode
        # graphs' batch-1 bucket) and all together (requests joining and finishing mid-run)
        uneven = [SamplingParams(temperature=0, max_tokens=8 + 5 * i, ignore_eos=True) for i in range(len(prompts))]
        for label, run in (("one at a time", lambda llm: [llm.generate(p, plain, use_tqdm=False)[0] for p in prompts]),
                           ("together", lambda llm: llm.generate(prompts, uneven, use_tqdm=False))):
            runs = [[o.outputs[0].token_ids for o in run(LLM(path, dtype="float32", enforce_eager=False,
                                                             async_scheduling=a))] for a in (False, True)]
            same = sum(a == b for a, b in zip(*runs))
            print(f"async scheduling == steps in turn, {label}: {same}/{len(prompts)} prompts")


if __name__ == "__main__":
    main()
