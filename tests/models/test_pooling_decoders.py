"""The spine's decoders as pooling models (convert, *ForSequenceClassification, reward models,
the Qwen3 reranker recipe), against HF transformers on tiny random checkpoints."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from kiln import LLM, PoolerConfig, PoolingParams
from kiln.models import supported_architectures
from kiln.runtime.demo import build_checkpoint, tiny_config

TEXTS = ["Hello, my name is", "The capital of France is a city that", "Once upon a time there was a small engine"]
FAMILIES = sorted(a for a, e in supported_architectures().items() if e.tasks == ("generate",))


def ids_of(tokenizer, text) -> torch.Tensor:
    return torch.tensor([tokenizer(text).input_ids])


@pytest.mark.parametrize("arch", FAMILIES)
def test_convert_embed_is_the_normalised_last_hidden_state(arch, checkpoints, tokenizer):
    llm = LLM(checkpoints[arch], runner="pooling", convert="embed")
    hf = AutoModel.from_pretrained(checkpoints[arch], dtype=torch.float32)
    for text, out in zip(TEXTS, llm.embed(TEXTS, use_tqdm=False)):
        ref = F.normalize(hf(ids_of(tokenizer, text)).last_hidden_state[0, -1], dim=-1)
        assert F.cosine_similarity(ref, torch.tensor(out.outputs.embedding), dim=0) >= 0.9999


@pytest.mark.parametrize("arch", FAMILIES)
def test_sequence_classification_matches_hf(arch, checkpoints, tokenizer, tmp_path):
    config = AutoConfig.from_pretrained(checkpoints[arch])
    config.num_labels, config.pad_token_id = 3, 2
    config.architectures = [arch.replace("ForCausalLM", "ForSequenceClassification")]
    torch.manual_seed(0)
    hf = AutoModelForSequenceClassification.from_config(config)
    hf.save_pretrained(tmp_path), tokenizer.save_pretrained(tmp_path)
    llm = LLM(str(tmp_path), runner="pooling")
    assert llm.llm_engine.tasks == ("classify", "score")
    for text, out in zip(TEXTS, llm.classify(TEXTS, use_tqdm=False)):
        ref = hf(ids_of(tokenizer, text)).logits[0].softmax(-1)
        torch.testing.assert_close(torch.tensor(out.outputs.probs), ref, atol=1e-5, rtol=1e-5)
    raw = llm.classify(TEXTS[0], PoolingParams(activation=False), use_tqdm=False)[0]
    torch.testing.assert_close(torch.tensor(raw.outputs.probs), hf(ids_of(tokenizer, TEXTS[0])).logits[0], atol=1e-5, rtol=0)


def test_qwen3_reranker_recipe(tmp_path):
    """Qwen3ForCausalLM loaded with the reranker hf_overrides: score = P(yes) of a yes/no softmax
    at the last token of the templated prompt."""
    tokenizer = _with_yes_no()
    path = build_checkpoint(str(tmp_path / "qwen3"), "Qwen3ForCausalLM", tokenizer=tokenizer)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    llm = LLM(path, runner="pooling", hf_overrides={
        "architectures": ["Qwen3ForSequenceClassification"], "classifier_from_token": ["no", "yes"],
        "is_original_qwen3_reranker": True})
    query, docs = "What is the capital of France?", ["Paris is the capital of France.", "The sea is calm."]
    scores = llm.score(query, docs, use_tqdm=False)
    from kiln.runtime.score_templates import QWEN3_RERANKER, render

    yes, no = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
    for doc, out in zip(docs, scores):
        logits = hf(ids_of(tokenizer, render(QWEN3_RERANKER, query, doc))).logits[0, -1]
        ref = torch.stack([logits[no], logits[yes]]).softmax(-1)[1]
        assert out.outputs.score == pytest.approx(ref.item(), abs=1e-5)


def test_builtin_score_templates_by_name_and_by_checkpoint_name(tmp_path):
    """A reranker whose directory names it (mxbai-rerank-base-v2) gets its own prompt format
    without chat_template=; another format is picked by its built-in name; each score equals the
    HF model's 2-way softmax at the last token of that rendered prompt."""
    from kiln.runtime.score_templates import BGE_RERANKER_V2_GEMMA, MXBAI_RERANK_V2, render

    tokenizer = _with_yes_no()
    path = build_checkpoint(str(tmp_path / "mxbai-rerank-base-v2"), "Qwen2ForCausalLM", tokenizer=tokenizer)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    llm = LLM(path, runner="pooling", hf_overrides={
        "architectures": ["Qwen2ForSequenceClassification"], "classifier_from_token": ["no", "yes"],
        "method": "from_2_way_softmax"})
    query, docs = "What is the capital of France?", ["Paris is the capital of France.", "The sea is calm."]
    tokenizer = llm.get_tokenizer()  # as saved and reloaded: "no" inside "not" splits as the added token there
    yes, no = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
    for template, scores in ((MXBAI_RERANK_V2, llm.score(query, docs, use_tqdm=False)),
                             (BGE_RERANKER_V2_GEMMA, llm.score(query, docs, use_tqdm=False,
                                                               chat_template="bge_reranker_v2_gemma"))):
        for doc, out in zip(docs, scores):
            logits = hf(ids_of(tokenizer, render(template, query, doc))).logits[0, -1]
            ref = torch.stack([logits[no], logits[yes]]).softmax(-1)[1]
            assert out.outputs.score == pytest.approx(ref.item(), abs=1e-5)


def _with_yes_no():
    """The demo tokenizer with "yes" and "no" as whole tokens, as a real reranker's vocabulary has."""
    from kiln.runtime.demo import train_tokenizer

    tok = train_tokenizer()
    tok.add_tokens(["yes", "no"])
    return tok


def _reward_checkpoint(path, architecture: str, num_labels: int, tokenizer) -> str:
    """A Qwen2 decoder with the Qwen2.5-Math reward head (score.0: linear, ReLU, score.2: linear);
    transformers ships no class for it, so the reference is HF's Qwen2Model plus the head in torch."""
    config = tiny_config("Qwen2ForCausalLM", vocab_size=len(tokenizer))
    torch.manual_seed(0)
    base = AutoModel.from_config(config)
    head = {"score.0.weight": torch.randn(64, 64) * 0.2, "score.0.bias": torch.randn(64) * 0.2,
            "score.2.weight": torch.randn(num_labels, 64) * 0.2, "score.2.bias": torch.randn(num_labels) * 0.2}
    weights = {f"model.{k}": v.contiguous() for k, v in base.state_dict().items()} | head
    path.mkdir()
    save_file(weights, path / "model.safetensors")
    config.architectures, config.num_labels = [architecture], num_labels
    config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path), base, head


def _reference_reward(base, head, ids):
    h = base(ids).last_hidden_state[0]
    return F.linear(F.relu(F.linear(h, head["score.0.weight"], head["score.0.bias"])), head["score.2.weight"], head["score.2.bias"])


def test_qwen2_reward_model(tmp_path, tokenizer):
    path, base, head = _reward_checkpoint(tmp_path / "rm", "Qwen2ForRewardModel", 1, tokenizer)
    llm = LLM(path, runner="pooling")
    for text, out in zip(TEXTS, llm.reward(TEXTS, use_tqdm=False)):
        ref = _reference_reward(base, head, ids_of(tokenizer, text))
        assert out.outputs.data.shape == ref.shape  # one reward per token (ALL pooling)
        torch.testing.assert_close(out.outputs.data, ref, atol=1e-5, rtol=1e-5)


def test_qwen2_process_reward_model_step_pooling(tmp_path, tokenizer):
    path, base, head = _reward_checkpoint(tmp_path / "prm", "Qwen2ForProcessRewardModel", 2, tokenizer)
    step_tag = tokenizer(".").input_ids[-1]
    llm = LLM(path, runner="pooling", pooler_config={"step_tag_id": step_tag})
    text = "Step one. Step two. Step three."
    out = llm.reward(text, use_tqdm=False)[0]
    ids = ids_of(tokenizer, text)
    ref = _reference_reward(base, head, ids)[ids[0] == step_tag].softmax(-1)
    assert out.outputs.data.shape == (3, 2)
    torch.testing.assert_close(out.outputs.data, ref, atol=1e-5, rtol=1e-5)


def test_causal_lm_as_process_reward_model(checkpoints, tokenizer):
    """math-shepherd style: LlamaForCausalLM with a STEP pooler over two returned token ids."""
    path = checkpoints["LlamaForCausalLM"]
    step_tag, plus, minus = tokenizer(".").input_ids[-1], 10, 11
    llm = LLM(path, runner="pooling", convert="reward",
              pooler_config=PoolerConfig(pooling_type="STEP", step_tag_id=step_tag, returned_token_ids=[plus, minus]))
    text = "Step one. Step two."
    out = llm.reward(text, use_tqdm=False)[0]
    ids = ids_of(tokenizer, text)
    logits = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)(ids).logits[0]
    ref = logits[ids[0] == step_tag][:, [plus, minus]].softmax(-1)
    torch.testing.assert_close(out.outputs.data, ref, atol=1e-5, rtol=1e-5)


def test_matryoshka_dimensions_and_cosine_score(checkpoints):
    llm = LLM(checkpoints["Qwen3ForCausalLM"], runner="pooling")
    full = torch.tensor(llm.embed(TEXTS[0], PoolingParams(normalize=False), use_tqdm=False)[0].outputs.embedding)
    short = llm.embed(TEXTS[0], PoolingParams(dimensions=16), use_tqdm=False)[0].outputs.embedding
    torch.testing.assert_close(torch.tensor(short), F.normalize(full[:16], dim=0))
    a, b = llm.embed(TEXTS[:2], use_tqdm=False)
    score = llm.score(TEXTS[0], TEXTS[1], use_tqdm=False)[0].outputs.score
    assert score == pytest.approx(float(torch.tensor(a.outputs.embedding) @ torch.tensor(b.outputs.embedding)), abs=1e-5)


def test_pooling_bad_input_and_engine_keeps_serving(checkpoints):
    path = checkpoints["LlamaForCausalLM"]
    pool = LLM(path, runner="pooling", max_model_len=32)
    gen = LLM(path)
    with pytest.raises(ValueError, match="pooling model"):
        pool.generate("hi")
    with pytest.raises(ValueError, match="runner='pooling'"):
        gen.embed("hi")
    with pytest.raises(ValueError, match="empty"):
        pool.embed("", use_tqdm=False)
    long_ids = {"prompt_token_ids": list(range(10, 50))}
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        pool.embed(long_ids, use_tqdm=False)
    assert len(pool.embed(long_ids, truncate_prompt_tokens=32, use_tqdm=False)[0].prompt_token_ids) == 32
    with pytest.raises(ValueError, match="same length"):
        pool.score(["a", "b"], ["c", "d", "e"], use_tqdm=False)
    with pytest.raises(ValueError, match="not 'classify'"):
        pool.classify("hi", use_tqdm=False)
    with pytest.raises(ValueError, match="dimensions"):
        PoolingParams(dimensions=0)
    assert len(pool.embed(TEXTS, use_tqdm=False)) == 3
    assert not pool.llm_engine.has_unfinished_requests()
