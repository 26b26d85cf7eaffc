"""The LLM API end to end on a tiny Llama: batching, chunked prefill, preemption and prefix caching
leave greedy tokens unchanged; SamplingParams fields do what vLLM users expect."""

from __future__ import annotations

import itertools

import pytest
import torch

from kiln import LLM, SamplingParams

PROMPTS = [
    "Hello, my name is",
    "The capital of France is",
    "Paged attention keeps keys and values in fixed-size blocks so that memory is never wasted, and the",
    "Once upon a time there was a small engine",
]


def greedy(max_tokens=20, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def llm(llama_path):
    return LLM(llama_path)


@pytest.fixture(scope="module")
def reference(llm):
    """Each prompt alone, greedy."""
    return [tokens(llm.generate(p, greedy(), use_tqdm=False))[0] for p in PROMPTS]


def test_batch_of_mixed_lengths_equals_each_alone(llm, reference):
    assert tokens(llm.generate(PROMPTS, greedy(), use_tqdm=False)) == reference


def test_chunked_prefill_gives_the_same_tokens(llama_path, reference, monkeypatch):
    chunked = LLM(llama_path, max_num_batched_tokens=5)
    # each step's attention layout reaches the device with its inputs (one staged copy), as the
    # attention kernels read it: query_start_loc [B+1] and seq_lens [B], int32
    from kiln.ir.context import get_forward_context

    runner, layouts = chunked.llm_engine.runner, []
    forward = runner.forward
    monkeypatch.setattr(runner, "forward", lambda *a, **kw: layouts.append(get_forward_context().attn) or forward(*a, **kw))
    assert tokens(chunked.generate(PROMPTS, greedy(), use_tqdm=False)) == reference
    assert layouts and all(md.query_start_loc.dtype == md.seq_lens_tensor.dtype == torch.int32 for md in layouts)
    for md in layouts:
        assert md.query_start_loc.tolist() == [0, *itertools.accumulate(md.query_lens)]
        assert md.seq_lens_tensor.tolist() == md.seq_lens


def test_preemption_gives_the_same_tokens(llama_path, reference):
    # 16 blocks of 4 tokens: enough for any one request, not for the four at once
    tight = LLM(llama_path, block_size=4, num_gpu_blocks_override=16, max_model_len=64, enable_prefix_caching=False)
    assert tokens(tight.generate(PROMPTS, greedy(), use_tqdm=False)) == reference
    assert tight.llm_engine.scheduler.num_preemptions > 0
    assert tight.llm_engine.block_manager.num_free_blocks == 16


def test_prefix_cache_hits_give_the_same_tokens(llm, reference):
    engine = llm.llm_engine
    first = llm.generate(PROMPTS[2], greedy(), use_tqdm=False)[0]
    again = llm.generate([PROMPTS[2]] * 3, greedy(), use_tqdm=False)
    assert tokens(again) == [reference[2]] * 3
    block_size = engine.block_manager.block_size
    full_blocks = (len(first.prompt_token_ids) - 1) // block_size
    assert full_blocks >= 2 and all(o.num_cached_tokens == full_blocks * block_size for o in again)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_seeded_sampling_is_reproducible_and_n_gives_n(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_tokens=16, seed=7, n=3, ignore_eos=True)
    a = llm.generate(PROMPTS[:2], params, use_tqdm=False)
    b = llm.generate(PROMPTS[:2], params, use_tqdm=False)
    assert [[c.token_ids for c in o.outputs] for o in a] == [[c.token_ids for c in o.outputs] for o in b]
    assert all(len(o.outputs) == 3 and [c.index for c in o.outputs] == [0, 1, 2] for o in a)
    assert len({tuple(c.token_ids) for c in a[0].outputs}) > 1, "the n samples differ"
    c = llm.generate(PROMPTS[:2], params.clone(seed=8), use_tqdm=False)
    assert tokens(c) != tokens(a)


def test_output_object_fields(llm):
    out = llm.generate(PROMPTS[0], greedy(max_tokens=5, logprobs=3), use_tqdm=False)[0]
    assert out.finished and out.prompt == PROMPTS[0] and out.request_id
    assert out.prompt_token_ids == llm.get_tokenizer()(PROMPTS[0]).input_ids
    comp = out.outputs[0]
    assert comp.finish_reason == "length" and comp.stop_reason is None and len(comp.token_ids) == 5
    assert comp.text == llm.get_tokenizer().decode(comp.token_ids, skip_special_tokens=True)
    for lp, tok in zip(comp.logprobs, comp.token_ids):
        assert lp[tok].rank == 1 and 3 <= len(lp) <= 4  # greedy: the chosen token is the most likely
        assert sorted(v.rank for v in lp.values())[:3] == [1, 2, 3]


def test_output_kinds_cumulative_reports_every_step_final_only_the_last(llm):
    """The engine API: CUMULATIVE (the default) returns an output each step; FINAL_ONLY (what
    LLM.generate asks for) only the finished one, equal to CUMULATIVE's last; DELTA is refused."""
    from kiln.runtime.sampling_params import RequestOutputKind

    engine = llm.llm_engine
    runs = {}
    for kind in (RequestOutputKind.CUMULATIVE, RequestOutputKind.FINAL_ONLY):
        engine.add_request(f"kind-{kind.name}", PROMPTS[1], greedy(max_tokens=6, output_kind=kind))
        outs = []
        while engine.has_unfinished_requests():
            outs += engine.step()
        runs[kind] = outs
    cumulative, final = runs[RequestOutputKind.CUMULATIVE], runs[RequestOutputKind.FINAL_ONLY]
    assert len(cumulative) == 6 and [o.finished for o in cumulative] == [False] * 5 + [True]
    assert len(final) == 1 and final[0].finished
    assert final[0].outputs[0].token_ids == cumulative[-1].outputs[0].token_ids
    assert final[0].outputs[0].text == cumulative[-1].outputs[0].text
    with pytest.raises(ValueError, match="DELTA is not served"):
        SamplingParams(output_kind=RequestOutputKind.DELTA)


def test_stop_token_ids_stop_strings_and_min_tokens(llm, reference):
    ref = reference[1]
    stop_tok = ref[5]
    out = llm.generate(PROMPTS[1], greedy(stop_token_ids=[stop_tok]), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == ref[:ref.index(stop_tok) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_tok

    full = llm.generate(PROMPTS[1], greedy(), use_tqdm=False)[0].outputs[0].text
    stop = full[6:9]
    out = llm.generate(PROMPTS[1], greedy(stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full[:full.index(stop)]
    kept = llm.generate(PROMPTS[1], greedy(stop=[stop], include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert kept.text == full[:full.index(stop) + len(stop)]

    out = llm.generate(PROMPTS[1], greedy(min_tokens=8, stop_token_ids=[ref[0]]), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) >= 8 and ref[0] not in out.token_ids[:7]


def test_eos_from_generation_config_stops_unless_ignored(llama_path, reference, tmp_path):
    import json
    import shutil

    path = shutil.copytree(llama_path, tmp_path / "m")
    eos = reference[0][3]  # a token greedy decoding emits at step 4: make it the EOS
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    llm = LLM(str(path))
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == reference[0][:4]
    assert out.finish_reason == "stop" and out.stop_reason is None
    ignored = llm.generate(PROMPTS[0], greedy(), use_tqdm=False)[0].outputs[0]
    assert ignored.token_ids == reference[0] and ignored.finish_reason == "length"


def test_max_tokens_none_runs_to_max_model_len(llama_path):
    llm = LLM(llama_path, max_model_len=40)
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(temperature=0, max_tokens=None, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 37 and out.outputs[0].finish_reason == "length"


def test_chat_uses_the_template(llm):
    messages = [{"role": "user", "content": "Hello"}]
    out = llm.chat(messages, greedy(max_tokens=4), use_tqdm=False)[0]
    tok = llm.get_tokenizer()
    expected = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert out.prompt_token_ids == list(expected)
    assert len(out.outputs[0].token_ids) == 4


def test_token_prompts_without_tokenizer(llama_path, reference, llm):
    bare = LLM(llama_path, skip_tokenizer_init=True)
    ids = llm.get_tokenizer()(PROMPTS[3]).input_ids
    out = bare.generate({"prompt_token_ids": ids}, greedy(), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == reference[3] and out.outputs[0].text == ""
    with pytest.raises(ValueError, match="tokenizer"):
        bare.generate("text needs a tokenizer", greedy(), use_tqdm=False)


def test_apply_model(llm):
    assert llm.apply_model(lambda m: type(m).__name__) == ["LlamaForCausalLM"]


def test_half_precision_dtypes_load_and_run(llama_path):
    import torch

    for dtype, expect in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        llm = LLM(llama_path, dtype=dtype)
        assert llm.apply_model(lambda m: m.model.embed_tokens.weight.dtype) == [expect]
        out = llm.generate(PROMPTS[0], greedy(max_tokens=4), use_tqdm=False)[0]
        assert len(out.outputs[0].token_ids) == 4


def test_offline_token_budget_on_a_large_gpu(llama_path, monkeypatch):
    from kiln.runtime import llm as llm_module

    def budget(**kw):
        return LLM(llama_path, **kw).llm_engine.scheduler.max_num_batched_tokens

    assert budget() == 8192  # the engine's (and the server's) default
    monkeypatch.setattr(llm_module, "_large_gpu", lambda: True)
    assert budget() == llm_module.OFFLINE_BATCHED_TOKENS == 16384
    assert budget(max_num_batched_tokens=64) == 64 and budget(device="cpu") == 8192
