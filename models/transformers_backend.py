"""The Transformers modeling backend: any HF model whose attention goes through transformers'
attention interface runs inside kiln's runtime (paged KV cache, continuous batching, sampler,
poolers).

kiln registers its own attention function under the name "kiln"; the HF model is built with
`attn_implementation="kiln"`, so every attention layer calls `ops.attention`, which reads the
batch layout and the KV cache from kiln's forward context exactly as native models do. The HF
model sees one flattened batch as a single sequence of T tokens (batch dimension 1) with kiln's
per-sequence position ids; HF builds no masks for an attention implementation that registers
none, and its own KV cache is off (`use_cache=False`).
"""

from __future__ import annotations

import logging

import torch
import transformers
from torch import nn
from transformers import AttentionInterface

from kiln.ir import ops

logger = logging.getLogger("kiln")

ATTN_IMPLEMENTATION = "kiln"


def kiln_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask, scaling: float | None = None, dropout: float = 0.0,
                   sliding_window: int | None = None, softcap: float | None = None, **kwargs):
    """transformers' attention-interface signature: query [1, H, T, D], key/value [1, Hkv, T, D]
    -> ([1, T, H, D], None)."""
    for unsupported in ("s_aux", "sinks", "position_bias"):
        if kwargs.get(unsupported) is not None:
            raise NotImplementedError(f"kiln attention does not support {unsupported!r} ({type(module).__name__})")
    if query.shape[0] != 1:
        raise RuntimeError("the Transformers backend runs flattened batches (batch dimension 1)")
    causal = getattr(module, "is_causal", True)
    window = int(sliding_window or 0)
    if window and not causal:  # HF keeps |q - k| < window; kiln's bidirectional window W keeps |q - k| <= W // 2
        window = 2 * (window - 1)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    out = ops.attention(q, k, v, module.layer_idx, float(scale), window, causal, float(softcap or 0.0))
    return out[None], None


AttentionInterface.register(ATTN_IMPLEMENTATION, kiln_attention)


def check_backend_compatible(model_cls: type, architecture: str) -> None:
    compatible = getattr(model_cls, "_supports_attention_backend", False)
    if not compatible:
        raise ValueError(
            f"{architecture} ({model_cls.__module__}.{model_cls.__name__}) cannot run on the Transformers backend: "
            f"its model class lacks `_supports_attention_backend = True` (its attention must go through "
            f"ALL_ATTENTION_FUNCTIONS with **kwargs passed down; see the supported-models page, 'Writing custom "
            f"models')")


_AUTO_CLASSES = {"generate": "AutoModelForCausalLM", "embed": "AutoModel",
                 "classify": "AutoModelForSequenceClassification", "token_classify": "AutoModelForTokenClassification"}
_TASK_SUFFIXES = {"generate": ("ForCausalLM", "LMHeadModel"), "classify": ("ForSequenceClassification",),
                  "token_classify": ("ForTokenClassification",)}


def hf_model_class(config, architecture: str, task: str, trust_remote_code: bool, path: str | None = None) -> type:
    """The HF class that serves `task` for this checkpoint: remote code from `auto_map` (only with
    trust_remote_code), the architecture's own class when it fits the task, else the task's auto
    class for the config type (a causal LM's base model for embeddings, say)."""
    auto_name = _AUTO_CLASSES[task]
    auto_map = getattr(config, "auto_map", None) or {}
    if auto_map and (auto_name in auto_map or "AutoModel" in auto_map):
        if not trust_remote_code:
            raise ValueError(f"{architecture} at {path!r} is a custom model (auto_map in config.json): its code runs "
                             "only with trust_remote_code=True")
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        ref = auto_map.get(auto_name) or auto_map["AutoModel"]
        return get_class_from_dynamic_module(ref, path)
    own = getattr(transformers, architecture, None)
    if own is not None and task != "embed" and architecture.endswith(_TASK_SUFFIXES[task]):
        return own
    if own is not None and task == "embed" and architecture.endswith("Model") and "For" not in architecture:
        return own  # a base model (BertModel, Qwen3Model)
    return _from_auto(auto_name, config, architecture)


def _from_auto(auto_name: str, config, architecture: str) -> type:
    mapping = getattr(transformers, auto_name)._model_mapping
    try:
        return mapping[type(config)]
    except KeyError:
        raise ValueError(f"transformers {transformers.__version__} has no {auto_name} class for {architecture} "
                         f"(config {type(config).__name__})") from None


_GENERATIVE_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def serves(config, architecture: str, runner: str) -> bool:
    """Whether the installed transformers (or the checkpoint's own code) has `architecture`, and it
    fits the runner: generation needs a generative architecture; pooling takes any."""
    known = getattr(transformers, architecture, None) is not None or bool(getattr(config, "auto_map", None))
    return known and (runner != "generate" or architecture.endswith(_GENERATIVE_SUFFIXES))


class _TransformersBase(nn.Module):
    """An HF PreTrainedModel adapted to kiln's model protocol (flattened batch in, hidden out)."""

    task = "generate"

    def __init__(self, hf_model: nn.Module, config):
        super().__init__()
        self.hf = hf_model
        self.config = config
        self.base = hf_model.get_decoder() if self.task == "generate" else getattr(hf_model, hf_model.base_model_prefix, hf_model)
        # kept for the tensor/pipeline-parallel work: how the model says to shard itself
        self.base_model_tp_plan = getattr(config, "base_model_tp_plan", None)
        self.base_model_pp_plan = getattr(config, "base_model_pp_plan", None)
        attn_layers = [m for m in hf_model.modules() if hasattr(m, "layer_idx") and hasattr(m, "is_causal")]
        self.is_causal = all(m.is_causal for m in attn_layers) if attn_layers else True
        self._roberta_positions = "roberta" in config.model_type or config.model_type == "camembert"
        import inspect

        self._takes_token_types = "token_type_ids" in inspect.signature(self.base.forward).parameters

    @classmethod
    def load(cls, path: str, config, architecture: str, dtype: torch.dtype, device: torch.device,
             trust_remote_code: bool = False) -> "_TransformersBase":
        config._attn_implementation = ATTN_IMPLEMENTATION
        hf_cls = hf_model_class(config, architecture, cls.task, trust_remote_code, path)
        check_backend_compatible(hf_cls, architecture)
        hf_model = hf_cls.from_pretrained(path, config=config, dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION,
                                          trust_remote_code=trust_remote_code).to(device).eval()
        return cls(hf_model, config)

    @staticmethod
    def usable_positions(config) -> int:
        text = config.get_text_config()
        positions = getattr(text, "max_position_embeddings", None) or 2048
        if "roberta" in text.model_type or text.model_type == "camembert":
            positions -= text.pad_token_id + 1
        return positions

    def kv_cache_spec(self) -> tuple[int, int, int]:
        text = self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        return text.num_hidden_layers, getattr(text, "num_key_value_heads", None) or heads, head_dim

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, token_type_ids: torch.Tensor | None = None):
        kwargs = {}
        if self._takes_token_types:
            kwargs["token_type_ids"] = (token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids))[None]
        if self._roberta_positions:  # RoBERTa counts positions from the pad id + 1
            positions = positions + self.config.pad_token_id + 1
        if self.task == "generate" or self.is_causal:
            kwargs["use_cache"] = False
        out = self.base(input_ids=input_ids[None], position_ids=positions[None], **kwargs)
        return out[0][0]


class TransformersForCausalLM(_TransformersBase):
    task = "generate"

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.hf.get_output_embeddings()(hidden)
        # the post-processing some HF heads apply after the projection
        if getattr(self.config, "logit_scale", None) not in (None, 1.0) and self.config.model_type.startswith("cohere"):
            logits = logits * self.config.logit_scale
        if getattr(self.config, "logits_scaling", None) not in (None, 1.0):
            logits = logits / self.config.logits_scaling
        if getattr(self.config, "final_logit_softcapping", None):
            cap = self.config.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits.float()


class TransformersEmbeddingModel(_TransformersBase):
    """The base model's hidden states; pooled from [CLS] for encoders, the last token for decoders."""

    task = "embed"

    @property
    def default_pooling_type(self) -> str:
        return "LAST" if self.is_causal else "CLS"


class TransformersForSequenceClassification(TransformersEmbeddingModel):
    task = "classify"

    def __init__(self, hf_model, config):
        super().__init__(hf_model, config)
        self.num_labels = config.num_labels

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        hf = self.hf
        if hasattr(hf, "score"):  # decoders: a linear score on the last token
            return hf.score(pooled)
        pooler = getattr(self.base, "pooler", None)
        if pooler is not None:  # BERT-style: pooler (dense + tanh on [CLS]) then classifier
            return hf.classifier(pooler(pooled[:, None, :]))
        if hasattr(hf.classifier, "out_proj"):  # RoBERTa-style head reads [CLS] from the sequence
            return hf.classifier(pooled[:, None, :])
        return hf.classifier(pooled)


class TransformersForTokenClassification(TransformersEmbeddingModel):
    task = "token_classify"
    default_pooling_type = "ALL"

    def __init__(self, hf_model, config):
        super().__init__(hf_model, config)
        self.num_labels = config.num_labels

    def head(self, rows: torch.Tensor) -> torch.Tensor:
        return self.hf.classifier(rows)


def backend_class(architecture: str, runner: str, convert: str) -> tuple[type, tuple[str, ...]]:
    """Which backend wrapper serves `architecture` for runner/convert, and its tasks."""
    if runner == "generate":
        return TransformersForCausalLM, ("generate",)
    if architecture.endswith("ForSequenceClassification") or convert == "classify":
        return TransformersForSequenceClassification, ("classify", "score")
    if architecture.endswith("ForTokenClassification"):
        return TransformersForTokenClassification, ("token_classify",)
    return TransformersEmbeddingModel, ("embed", "score")
