"""Falcon's other layouts against HF (the parity test covers Falcon-40B's grouped layout): Falcon-7B's
multi-query attention with a parallel MLP, and the sequential layout with one KV head per query
head; an ALiBi checkpoint is a clear error."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from kiln import LLM, SamplingParams
from kiln.runtime.demo import build_checkpoint

from .test_parity import MAX_TOKENS, PROMPTS, hf_greedy


@pytest.mark.parametrize("layout", [
    dict(multi_query=True, parallel_attn=True),  # Falcon-7B
    dict(multi_query=False, parallel_attn=False, bias=True, tie_word_embeddings=True),
], ids=["multi-query-parallel", "sequential"])
def test_falcon_layouts_match_hf(layout, tmp_path, tokenizer):
    path = build_checkpoint(str(tmp_path / "falcon"), "FalconForCausalLM", tokenizer=tokenizer, **layout)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0)
    for out in LLM(path, dtype="float32").generate(PROMPTS, params, use_tqdm=False):
        tokens, logprobs = hf_greedy(hf, out.prompt_token_ids, MAX_TOKENS)
        got = out.outputs[0]
        assert got.token_ids == tokens
        ours = [lp[t].logprob for lp, t in zip(got.logprobs, got.token_ids)]
        torch.testing.assert_close(torch.tensor(ours), torch.tensor(logprobs), atol=1e-4, rtol=0)


def test_alibi_falcon_is_a_clear_error(tmp_path, tokenizer):
    path = build_checkpoint(str(tmp_path / "falcon-rw"), "FalconForCausalLM", tokenizer=tokenizer, alibi=True)
    with pytest.raises(ValueError, match="alibi=True .* not supported"):
        LLM(path, model_impl="kiln")
