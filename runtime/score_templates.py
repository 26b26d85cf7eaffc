"""Prompt templates for rerankers that score a (query, document) pair as one text.

A template is Jinja rendered with `messages = [{"role": "query", ...}, {"role": "document", ...}]`,
the form vLLM's score templates take; `LLM.score(..., chat_template=...)` passes one explicitly,
as Jinja text or by a built-in's name (`BUILTIN`); without one, a reranker the checkpoint's name
identifies gets its own.
"""

from __future__ import annotations

import jinja2

# The Qwen3 reranker's own prompt (Qwen/Qwen3-Reranker model card), loaded with
# hf_overrides={"is_original_qwen3_reranker": True, ...}.
QWEN3_RERANKER = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
    "<Instruct>: {{ instruction | default('Given a web search query, retrieve relevant passages that answer the query') }}\n"
    "{% for m in messages %}{% if m.role == 'query' %}<Query>: {{ m.content }}\n{% endif %}{% endfor %}"
    "{% for m in messages %}{% if m.role == 'document' %}<Document>: {{ m.content }}{% endif %}{% endfor %}"
    "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
)


# The prompt formats the rerankers of the supported-models page were trained with (their model
# cards), as templates over the same `messages`.
_QUERY = "{% for m in messages %}{% if m.role == 'query' %}{{ m.content }}{% endif %}{% endfor %}"
_DOCUMENT = "{% for m in messages %}{% if m.role == 'document' %}{{ m.content }}{% endif %}{% endfor %}"

# mixedbread-ai/mxbai-rerank-{base,large}-v2 (Qwen2ForSequenceClassification via classifier_from_token)
MXBAI_RERANK_V2 = (
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    f"<|im_start|>user\nquery: {_QUERY}\ndocument: {_DOCUMENT}\n"
    "You are a search relevance expert who evaluates how well documents match search queries. For each "
    "query-document pair, carefully analyze the semantic relationship between them, then provide your binary "
    "relevance judgment (0 for not relevant, 1 for relevant).\nRelevance:<|im_end|>\n<|im_start|>assistant\n"
)
# BAAI/bge-reranker-v2-gemma (the logit of "Yes")
BGE_RERANKER_V2_GEMMA = (
    f"A: {_QUERY}\nB: {_DOCUMENT}\nGiven a query A and a passage B, determine whether the passage contains an "
    "answer to the query by providing a prediction of either 'Yes' or 'No'."
)
# nvidia/llama-nemotron-rerank-1b-v2
NEMOTRON_RERANK = f"question:{_QUERY} \n \n passage:{_DOCUMENT}"

BUILTIN = {"qwen3_reranker": QWEN3_RERANKER, "mxbai_rerank_v2": MXBAI_RERANK_V2,
           "bge_reranker_v2_gemma": BGE_RERANKER_V2_GEMMA, "nemotron_rerank": NEMOTRON_RERANK}
# checkpoint names (as in config.json's `_name_or_path` or the directory) -> built-in template
_BY_MODEL_NAME = (("qwen3-reranker", "qwen3_reranker"), ("mxbai-rerank-", "mxbai_rerank_v2"),
                  ("bge-reranker-v2-gemma", "bge_reranker_v2_gemma"), ("nemotron-rerank", "nemotron_rerank"))


def resolve_template(template: str | None) -> str | None:
    """A template as given, or the built-in one it names ("mxbai_rerank_v2", ...)."""
    return BUILTIN.get(template, template) if template is not None else None


def default_score_template(hf_config) -> str | None:
    """The model's own score template: the Qwen3 reranker recipe's flag, or a reranker the
    checkpoint's name identifies (mxbai-rerank-*-v2, bge-reranker-v2-gemma, nemotron-rerank)."""
    if getattr(hf_config, "is_original_qwen3_reranker", False):
        return QWEN3_RERANKER
    name = str(getattr(hf_config, "name_or_path", "") or "").lower().rstrip("/").rsplit("/", 1)[-1]
    for marker, key in _BY_MODEL_NAME:
        if marker in name and (key != "mxbai_rerank_v2" or name.endswith("v2")):
            return BUILTIN[key]
    return None


def render(template: str, query: str, document: str, **kwargs) -> str:
    env = jinja2.Environment()
    messages = [{"role": "query", "content": query}, {"role": "document", "content": document}]
    return env.from_string(template).render(messages=messages, **kwargs)


def cross_encoder_prompts(engine, first: list[str], second: list[str], truncate: int | None,
                          template: str | None = None) -> list[dict]:
    """The (query, document) pairs as one tokenized input each, for a cross-encoder or reranker:
    through `template` (or the model's own score template) when there is one, else the
    tokenizer's sentence-pair encoding (with token type ids). Used by `LLM.score` and the server."""
    tokenizer = engine.tokenizer
    if tokenizer is None:
        raise ValueError("score needs a tokenizer (skip_tokenizer_init=True was given)")
    if getattr(engine.model, "num_labels", 1) != 1:
        raise ValueError(f"score needs a model with one output label; {engine.architecture} has "
                         f"{engine.model.num_labels}: use classify")
    template = resolve_template(template) or default_score_template(engine.hf_config)
    limit = engine.max_model_len if truncate == -1 else truncate
    prompts = []
    for a, b in zip(first, second):
        if template is not None:
            text = render(template, a, b)
            ids = tokenizer(text, truncation=limit is not None, max_length=limit).input_ids
            prompts.append({"prompt": text, "prompt_token_ids": ids})
            continue
        enc = tokenizer(a, b, truncation=limit is not None, max_length=limit)
        prompt = {"prompt_token_ids": enc["input_ids"]}
        if "token_type_ids" in enc:
            prompt["token_type_ids"] = enc["token_type_ids"]
        prompts.append(prompt)
    return prompts
