"""Parity with HF transformers: every registered generate architecture, on a tiny random float32
checkpoint, gives HF's greedy tokens and logprobs."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from kiln import LLM, SamplingParams
from kiln.models import supported_architectures
from kiln.runtime.demo import build_checkpoint

PROMPTS = [
    "Hello, my name is",
    "The capital of France is a city that",
    "Paged attention keeps keys and values in fixed-size blocks so that memory is never wasted, and the",
]
MAX_TOKENS = 24

# text generation; speech-to-text models have their own parity test (test_whisper.py)
GENERATE_ARCHS = sorted(a for a, e in supported_architectures().items() if e.tasks == ("generate",))


def hf_greedy(hf_model, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], list[float]]:
    """HF's greedy continuation (EOS disabled) and the raw logprob of each chosen token."""
    ids = torch.tensor([prompt_ids])
    out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                            eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, ids.shape[1]:].tolist()
    logprobs = torch.stack(out.logits, 1)[0].float().log_softmax(-1)
    return tokens, [logprobs[i, t].item() for i, t in enumerate(tokens)]


def greedy(**extra) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0, **extra)


@pytest.mark.parametrize("arch", GENERATE_ARCHS)
def test_greedy_tokens_and_logprobs_match_hf(arch, checkpoints):
    path = checkpoints[arch]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    llm = LLM(path, dtype="float32")
    outs = llm.generate(PROMPTS, greedy(), use_tqdm=False)  # one batch of different lengths
    for out in outs:
        ref_tokens, ref_logprobs = hf_greedy(hf, out.prompt_token_ids, MAX_TOKENS)
        got = out.outputs[0]
        assert got.token_ids == ref_tokens, f"{arch}: {out.prompt!r}"
        ours = [lp[t].logprob for lp, t in zip(got.logprobs, got.token_ids)]
        torch.testing.assert_close(torch.tensor(ours), torch.tensor(ref_logprobs), atol=1e-4, rtol=0)
        assert got.cumulative_logprob == pytest.approx(sum(ours), abs=1e-3)
        assert got.finish_reason == "length"


@pytest.mark.parametrize("rope", [
    {"rope_type": "default", "rope_theta": 500.0},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
])
def test_rope_variants_match_hf(rope, tmp_path, tokenizer):
    path = build_checkpoint(str(tmp_path / "m"), "LlamaForCausalLM", tokenizer=tokenizer, rope_parameters=rope)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    out = LLM(path).generate(PROMPTS[2], greedy(), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == hf_greedy(hf, out.prompt_token_ids, MAX_TOKENS)[0]


def test_prompt_logprobs_match_hf_forward(llama_path):
    hf = AutoModelForCausalLM.from_pretrained(llama_path, dtype=torch.float32)
    llm = LLM(llama_path, max_num_batched_tokens=7)  # chunked prefill: prompt logprobs gathered over chunks
    out = llm.generate(PROMPTS[2], SamplingParams(max_tokens=1, prompt_logprobs=2), use_tqdm=False)[0]
    ids = out.prompt_token_ids
    ref = hf(torch.tensor([ids])).logits[0].log_softmax(-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    for pos in range(1, len(ids)):
        entry = out.prompt_logprobs[pos]
        assert entry[ids[pos]].logprob == pytest.approx(ref[pos - 1, ids[pos]].item(), abs=1e-4)
        assert entry[ids[pos]].rank == int((ref[pos - 1] > ref[pos - 1, ids[pos]]).sum()) + 1
        top = ref[pos - 1].topk(2).indices.tolist()
        assert set(top) <= set(entry), "the top-2 tokens are reported"
