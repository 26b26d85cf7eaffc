"""Generative decoders as pooling models, as vLLM's `convert` does: the same decoder with its LM
head replaced by what the task needs. Applied to a class; the weights are the checkpoint's."""

from __future__ import annotations

import functools

import torch
from torch import nn

from kiln.models.layers import Linear

# A base-model checkpoint (LlamaModel, Qwen2Model, ...) names its weights without "model." (a
# family of other names says its own: `base_model_prefixes`).
_BASE_PREFIXES = {"embed_tokens.": "model.embed_tokens.", "layers.": "model.layers.", "norm.": "model.norm."}


@functools.cache
def as_embedding_model(cls: type[nn.Module]) -> type[nn.Module]:
    """Hidden states out, pooled from the last token by default; no LM head."""

    class EmbeddingModel(cls):
        is_causal = True
        default_pooling_type = "LAST"
        ignored_weights = tuple(getattr(cls, "ignored_weights", ())) + ("lm_head.",)
        weight_prefix_map = getattr(cls, "base_model_prefixes", _BASE_PREFIXES)

        def __init__(self, config, architecture: str, max_positions: int | None = None):
            super().__init__(config, architecture, max_positions)
            if hasattr(self, "lm_head"):
                del self.lm_head

    EmbeddingModel.__name__ = EmbeddingModel.__qualname__ = cls.__name__.replace("ForCausalLM", "") + "EmbeddingModel"
    return EmbeddingModel


@functools.cache
def as_seq_cls_model(cls: type[nn.Module]) -> type[nn.Module]:
    """A linear `score` head on the last token's hidden state (HF's *ForSequenceClassification).

    With `classifier_from_token` in the config (set through hf_overrides, the reranker recipes),
    the head is made from the LM head's rows for those tokens once the tokenizer is known:
    `from_2_way_softmax` (two tokens, the default for two) scores w[second] - w[first], so a
    sigmoid gives the two-way softmax probability of the second; `no_post_processing` keeps the
    rows as they are. `is_original_qwen3_reranker` is the Qwen3 recipe: tokens ("no", "yes").
    """
    base = as_embedding_model(cls)

    class SequenceClassificationModel(base):
        def __init__(self, config, architecture: str, max_positions: int | None = None):
            super().__init__(config, architecture, max_positions)
            tokens = list(getattr(config, "classifier_from_token", None) or [])
            if getattr(config, "is_original_qwen3_reranker", False):
                tokens = tokens or ["no", "yes"]
                config.method = "from_2_way_softmax"
            self.classifier_from_token = tokens
            if tokens:  # load the LM head now, build the score head from it in convert_from_tokens
                self.method = getattr(config, "method", None) or ("from_2_way_softmax" if len(tokens) == 2 else "no_post_processing")
                if self.method not in ("from_2_way_softmax", "no_post_processing"):
                    raise ValueError(f"method={self.method!r} is not supported; use from_2_way_softmax or no_post_processing")
                self.num_labels = 1 if self.method == "from_2_way_softmax" else len(tokens)
                if not self.tie_word_embeddings:
                    self.lm_head = Linear(config.hidden_size, config.vocab_size)
                self.ignored_weights = tuple(getattr(cls, "ignored_weights", ()))
            else:
                self.num_labels = config.num_labels
                self.score = Linear(config.hidden_size, self.num_labels)

        def convert_from_tokens(self, tokenizer) -> None:
            if not self.classifier_from_token:
                return
            if tokenizer is None:
                raise ValueError("classifier_from_token needs the tokenizer (skip_tokenizer_init=False)")
            ids = []
            for tok in self.classifier_from_token:
                tid = tokenizer.convert_tokens_to_ids(tok)
                if tid is None or tid == tokenizer.unk_token_id:
                    raise ValueError(f"classifier_from_token: {tok!r} is not a token of the tokenizer")
                ids.append(tid)
            rows = self.lm_head_weight[ids]
            weight = (rows[1] - rows[0])[None] if self.method == "from_2_way_softmax" else rows
            self.score = Linear(weight.shape[1], weight.shape[0]).to(device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                self.score.weight.copy_(weight)
            if not self.tie_word_embeddings:
                del self.lm_head

        def head(self, pooled: torch.Tensor) -> torch.Tensor:
            return self.score(pooled)

    SequenceClassificationModel.__name__ = SequenceClassificationModel.__qualname__ = (
        cls.__name__.replace("ForCausalLM", "") + "ForSequenceClassification")
    return SequenceClassificationModel


@functools.cache
def as_reward_model(cls: type[nn.Module]) -> type[nn.Module]:
    """The LM head's logits at every token (or, with a STEP pooler config, at each step tag over
    `returned_token_ids`): process reward models such as math-shepherd."""

    class RewardModel(cls):
        is_causal = True
        default_pooling_type = "ALL"

        def head(self, pooled: torch.Tensor) -> torch.Tensor:
            return self.compute_logits(pooled)

    RewardModel.__name__ = RewardModel.__qualname__ = cls.__name__.replace("ForCausalLM", "") + "RewardModel"
    return RewardModel
