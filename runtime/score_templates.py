"""Prompt templates for rerankers that score a (query, document) pair as one text.

A template is Jinja rendered with `messages = [{"role": "query", ...}, {"role": "document", ...}]`,
the form vLLM's score templates take; `LLM.score(..., chat_template=...)` passes one explicitly.
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


def default_score_template(hf_config) -> str | None:
    if getattr(hf_config, "is_original_qwen3_reranker", False):
        return QWEN3_RERANKER
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
    template = template or default_score_template(engine.hf_config)
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
