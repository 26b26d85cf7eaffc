"""`LLM(model, kv_cache_dtype="fp8")`: the KV cache in float8_e4m3fn with per-layer k/v scales.

The reference ops store (x / scale).clamp(-448, 448) in fp8 and read cache * scale back in q's
dtype; the engine plans blocks by the cache's element size; greedy decoding stays close to the
"auto" cache's; a checkpoint's `self_attn.k_scale` / `v_scale` (or `k_proj.output_scale`) reach
the runner; a bad value is a clear ValueError. (The Triton kernels' fp8 paths are tested against
these reference ops in tests/codegen/test_kv_cache_fp8.py.)
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from kiln import LLM, SamplingParams
from kiln.ir import AttentionMetadata, ForwardContext, ops, set_forward_context
from kiln.runtime.config import EngineConfig
from kiln.runtime.demo import build_checkpoint

FP8 = torch.float8_e4m3fn
PROMPTS = [
    "Hello, my name is",
    "The capital of France is",
    "Paged attention keeps keys and values in fixed-size blocks so that memory is never wasted, and the",
    "Once upon a time there was a small engine",
    "The quick brown fox",
    "Numbers: 0 1 2 3",
]


# ---------------------------------------------------------------- the reference ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_write_then_read_is_the_quantize_dequantize_formula(dtype):
    torch.manual_seed(0)
    T, Hkv, D, block_size, k_scale, v_scale = 10, 2, 16, 4, 0.05, 0.3
    k = (torch.randn(T, Hkv, D) * 400 * k_scale).to(dtype)  # a quarter past 448 * k_scale: saturated
    v = (torch.randn(T, Hkv, D) * 3 * v_scale).to(dtype)
    k_cache, v_cache = (torch.zeros(4, block_size, Hkv, D, dtype=FP8) for _ in range(2))
    table = torch.tensor([2, 0, 3])  # positions 0..9 in blocks 2, 0, 3
    slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(T)])
    ops._write_kv(k, v, k_cache, v_cache, slots, k_scale, v_scale)

    ks = ops._seq_kv(k, k_cache, table, 0, T, T, k_scale)
    vs = ops._seq_kv(v, v_cache, table, 0, T, T, v_scale)
    expect_k = ((k.float() / k_scale).clamp(-448, 448).to(FP8).float() * k_scale).to(dtype)
    expect_v = ((v.float() / v_scale).clamp(-448, 448).to(FP8).float() * v_scale).to(dtype)
    assert ks.dtype == dtype and torch.equal(ks, expect_k) and torch.equal(vs, expect_v)
    assert ks.float().abs().max() == pytest.approx(448 * k_scale, rel=1e-2)  # saturated, not inf or NaN
    # the rest within half an e4m3 step (2^-4 relative; plus bfloat16's rounding of the result)
    inside = k.float().abs() < 448 * k_scale
    assert 0 < inside.float().mean() < 0.9
    err = (ks.float() - k.float()).abs()[inside]
    assert (err <= k.float().abs()[inside] * (2 ** -4 + 2 ** -8) + 2 ** -10 * k_scale).all()


@pytest.mark.parametrize("query_lens, seq_lens", [([6, 1], [6, 11]), ([1, 1], [7, 12])])
def test_reference_attention_over_fp8_is_attention_over_the_dequantized_cache(query_lens, seq_lens):
    """ops.attention with an fp8 cache and scales = ops.attention with a float32 cache that holds
    the dequantized values, for prefill, chunked and decode rows: the only difference is the cache."""
    torch.manual_seed(1)
    Hkv, D, block_size, scales = 2, 16, 4, [(0.07, 0.2)]
    num_blocks = sum(-(-n // block_size) for n in seq_lens)
    tables, slots, start = torch.zeros(2, 3, dtype=torch.long), [], 0
    for i, (q_len, seq_len) in enumerate(zip(query_lens, seq_lens)):
        row = list(range(start, start + -(-seq_len // block_size)))
        tables[i, :len(row)] = torch.tensor(row)
        start += len(row)
        slots += [row[p // block_size] * block_size + p % block_size for p in range(seq_len - q_len, seq_len)]
    md = AttentionMetadata(torch.tensor(slots), tables, query_lens, seq_lens, block_size)
    fp8 = [tuple(ops.quantize_kv(torch.randn(num_blocks, block_size, Hkv, D), s) for s in scales[0])]
    dequant = [tuple(ops.dequantize_kv(c, s, torch.float32) for c, s in zip(fp8[0], scales[0]))]
    T = sum(query_lens)
    q, k, v = torch.randn(T, 4, D), torch.randn(T, Hkv, D) * 0.1, torch.randn(T, Hkv, D) * 0.3
    with set_forward_context(ForwardContext(md, fp8, kv_scales=scales)):
        out = ops.attention(q, k, v, 0, 0.25)
    # the step's own k/v as the fp8 cache stores them
    qk, qv = (ops.dequantize_kv(ops.quantize_kv(x, s), s, torch.float32) for x, s in zip((k, v), scales[0]))
    with set_forward_context(ForwardContext(md, dequant)):
        ref = ops.attention(q, qk, qv, 0, 0.25)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize("value", ["fp16", "float8", "fp8_e5m2", "bfloat16", None])
def test_bad_kv_cache_dtype_is_a_clear_value_error(value):
    with pytest.raises(ValueError, match=r"kv_cache_dtype=.*not supported.*auto, fp8, fp8_e4m3"):
        EngineConfig(model="unused", kv_cache_dtype=value)


def test_bad_kv_cache_dtype_through_llm():
    with pytest.raises(ValueError, match="kv_cache_dtype='int4'"):  # before the model is even looked for
        LLM("no/such/model", kv_cache_dtype="int4")


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer):
    """A tiny random float32 Llama with weights drawn at std 0.05 (the shared fixture's 0.2 makes
    logits so flat and attention so peaked that a 3-bit mantissa flips 13% of its top-1 tokens; at
    0.05 that is 5%; a trained model's margins are larger still)."""
    path = str(tmp_path_factory.mktemp("fp8") / "llama")
    return build_checkpoint(path, "LlamaForCausalLM", tokenizer=tokenizer, initializer_range=0.05)


@pytest.fixture(scope="module")
def engines(ckpt):
    kw = dict(kv_cache_memory=1 << 20, max_model_len=128)
    return LLM(ckpt, **kw), LLM(ckpt, kv_cache_dtype="fp8", **kw)


def greedy(llm, prompts, max_tokens=12):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def test_fp8_cache_plans_blocks_by_element_size(engines, llama_path):
    auto, fp8 = (llm.llm_engine for llm in engines)
    (k, v), = {(c[0].dtype, c[1].dtype) for c in fp8.runner.kv_caches}
    assert k == v == FP8 and auto.runner.kv_caches[0][0].dtype == torch.float32
    assert fp8.runner.kv_scales == [(1.0, 1.0)] * len(fp8.runner.kv_caches)  # no scales in the checkpoint
    # float32 -> fp8 is 4 bytes -> 1: four times the blocks from the same 1 MiB
    assert fp8.block_manager.num_blocks == 4 * auto.block_manager.num_blocks == 512
    from kiln.runtime.model_runner import ModelRunner

    per = {dt: ModelRunner.bytes_per_block(auto.model, 16, dt) for dt in (torch.bfloat16, FP8)}
    assert per[torch.bfloat16] == 2 * per[FP8]  # a bfloat16 model gets twice the blocks


def test_fp8_cache_greedy_tokens_and_logprobs_close_to_auto(engines):
    """Teacher-forced over the auto cache's own greedy continuations (so one flip does not derail
    the rest): the fp8 cache's top-1 token agrees at >= 90% of positions (measured 94.7%, 160 of
    169) and the logprob of each token moves by at most 0.1, 0.03 on average (measured: max 0.044,
    mean 0.012). The first greedy token of every prompt is the same."""
    auto, fp8 = engines
    auto_tokens = greedy(auto, PROMPTS)
    fp8_tokens = greedy(fp8, PROMPTS)
    assert [t[0] for t in fp8_tokens] == [t[0] for t in auto_tokens]
    seqs = [{"prompt_token_ids": auto.llm_engine.tokenize(p)[1] + t} for p, t in zip(PROMPTS, auto_tokens)]
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)
    agree, diffs = [], []
    for a, f in zip(auto.generate(seqs, params, use_tqdm=False), fp8.generate(seqs, params, use_tqdm=False)):
        ids = a.prompt_token_ids
        for pos in range(1, len(ids)):
            la, lf = a.prompt_logprobs[pos], f.prompt_logprobs[pos]
            diffs.append(abs(la[ids[pos]].logprob - lf[ids[pos]].logprob))
            top = [next(t for t, lp in d.items() if lp.rank == 1) for d in (la, lf)]
            agree.append(top[0] == top[1])
    agreement, diffs = sum(agree) / len(agree), torch.tensor(diffs)
    print(f"top-1 agreement {agreement:.3f} over {len(agree)} positions; logprob diff max {diffs.max():.4f} "
          f"mean {diffs.mean():.4f}")
    assert agreement >= 0.9
    assert diffs.max() <= 0.1 and diffs.mean() <= 0.03


def test_checkpoint_kv_scales_reach_the_runner(ckpt, tmp_path):
    """compressed-tensors' `self_attn.k_scale` / `v_scale` (layer 0) and modelopt's
    `k_proj.output_scale` / `v_proj.output_scale` (layer 1) are taken from the checkpoint: the runner
    holds them, the cache holds k / k_scale, and an "auto" cache loads the same checkpoint."""
    from safetensors.torch import load_file, save_file

    path = str(tmp_path / "scaled")
    shutil.copytree(ckpt, path)
    file = os.path.join(path, "model.safetensors")
    weights = load_file(file)
    weights.update({"model.layers.0.self_attn.k_scale": torch.tensor(0.5),
                    "model.layers.0.self_attn.v_scale": torch.tensor(0.25),
                    "model.layers.1.self_attn.k_proj.output_scale": torch.tensor([0.125]),
                    "model.layers.1.self_attn.v_proj.output_scale": torch.tensor([2.0])})
    save_file(weights, file, metadata={"format": "pt"})

    kw = dict(kv_cache_dtype="fp8", kv_cache_memory=1 << 20, max_model_len=128)
    scaled, unscaled = LLM(path, **kw), LLM(ckpt, **kw)
    assert scaled.llm_engine.runner.kv_scales == [(0.5, 0.25), (0.125, 2.0)]
    assert greedy(scaled, PROMPTS[2:3], 4)[0][0] == greedy(unscaled, PROMPTS[2:3], 4)[0][0]
    # layer 0 saw the same keys and values (layer 1's inputs differ by the rounding of layer 0's
    # smallest values): stored over 0.5 and 0.25 rather than 1, i.e. 2x and 4x, exactly for powers
    # of two away from the subnormals; the same nonzero entries
    for mine, theirs, scale in zip(scaled.llm_engine.runner.kv_caches[0], unscaled.llm_engine.runner.kv_caches[0],
                                   (0.5, 0.25)):
        mine, theirs = mine.float(), theirs.float()
        assert torch.equal(mine != 0, theirs != 0) or ((mine != 0) != (theirs != 0)).float().mean() < 1e-3
        big = theirs.abs() >= 2 ** -4
        assert big.sum() > 100
        torch.testing.assert_close(mine[big] * scale, theirs[big], rtol=0, atol=0)
    # an "auto" cache has no use for the scales, and loads the checkpoint all the same
    assert LLM(path, kv_cache_memory=1 << 20, max_model_len=128).llm_engine.runner.kv_scales is None
    # the Transformers backend (transformers loads the weights, skipping the scales): the same scales
    backend = LLM(path, model_impl="transformers", **kw)
    assert backend.llm_engine.runner.kv_scales == [(0.5, 0.25), (0.125, 2.0)]
    assert greedy(backend, PROMPTS[2:3], 4)[0][0] == greedy(unscaled, PROMPTS[2:3], 4)[0][0]


def test_split_kv_scales_names():
    """The loader's filter: the kv-cache scale spellings are taken out (a single `kv_scale` serves
    both, a per-head scale becomes its max), every other weight (a linear's own weight_scale /
    input_scale included) passes through in order."""
    from kiln.frontend.loader import split_kv_scales

    names = {"model.layers.0.self_attn.k_scale": 0.5, "model.layers.0.self_attn.q_proj.weight": 1.0,
             "model.layers.1.self_attn.kv_scale": 0.25, "model.layers.2.self_attn.v_proj.output_scale": 2.0,
             "model.layers.2.self_attn.k_proj.weight_scale": 3.0, "model.layers.2.self_attn.k_proj.input_scale": 4.0,
             "model.layers.3.self_attn.attn.v_scale": [0.1, 0.3]}
    found = {}
    rest = [n for n, _ in split_kv_scales(((n, torch.tensor(v)) for n, v in names.items()), found)]
    assert rest == ["model.layers.0.self_attn.q_proj.weight", "model.layers.2.self_attn.k_proj.weight_scale",
                    "model.layers.2.self_attn.k_proj.input_scale"]
    assert found == {(0, "k"): 0.5, (1, "k"): 0.25, (1, "v"): 0.25, (2, "v"): 2.0,
                     (3, "v"): pytest.approx(0.3)}


def test_transformers_backend_with_fp8_cache(ckpt, engines):
    """The Transformers backend calls the same attention op: with an fp8 cache it gives the native
    engine's fp8 tokens."""
    hf = LLM(ckpt, model_impl="transformers", kv_cache_dtype="fp8", kv_cache_memory=1 << 20, max_model_len=128)
    assert hf.llm_engine.runner.kv_caches[0][0].dtype == FP8
    assert greedy(hf, PROMPTS[:3], 6) == greedy(engines[1], PROMPTS[:3], 6)
