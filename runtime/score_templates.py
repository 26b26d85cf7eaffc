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
