"""The Transformers modeling backend: any HF model whose attention goes through transformers'
attention interface runs inside kiln's runtime (paged KV cache, continuous batching, sampler,
poolers).

kiln registers its own attention function under the name "kiln"; the HF model is built with
`attn_implementation="kiln"`, so every attention layer calls `ops.attention`, which reads the
batch layout and the KV cache from kiln's forward context exactly as native models do. The HF
model sees one flattened batch as a single sequence of T tokens (batch dimension 1) with kiln's
per-sequence position ids; HF builds no masks for an attention implementation that registers
none, and its own KV cache is off (`use_cache=False`). The n-th attention call of a forward owns
the n-th layer of kiln's cache, whose shapes a probe forward measures at load (`_probe`).
Models with recurrent layers (Mamba, Mamba-2, short convolutions, linear attention) run per
sequence instead (`TransformersRecurrentForCausalLM`): each scheduled sequence's tokens are one
[1, L] forward of the HF model with transformers' own attention and its own cache object, one per
request, kept in the runtime's state slots (runtime/state_slots.py). Slower than the flattened
batch, and with no prefix caching and no chunked prefill (a state at a prefix is not stored).
Pooling runs each prompt alone, keeping no state.
"""

from __future__ import annotations

import logging

import torch
import transformers
from torch import nn
from transformers import AttentionInterface

from kiln.ir import get_forward_context, ops

logger = logging.getLogger("kiln")

ATTN_IMPLEMENTATION = "kiln"


class _AttentionCalls:
    """Which KV cache each attention call of a forward owns: the n-th call, the n-th layer of cache.
    Counting calls rather than reading `module.layer_idx` serves attention modules that have no
    layer_idx and modules called more than once per forward alike. While `probe` is a list, calls
    only record their layout into it (see `_TransformersBase._probe`)."""

    def __init__(self):
        self.next = 0
        self.probe: list[tuple[int, int, int, bool, int | None]] | None = None


_calls = _AttentionCalls()


def kiln_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask, scaling: float | None = None, dropout: float = 0.0,
                   sliding_window: int | None = None, softcap: float | None = None, **kwargs):
    """transformers' attention-interface signature: query [1, H, T, D], key [1, Hkv, T, D], value
    [1, Hkv, T, Dv] -> ([1, T, H, Dv], None). HF builds no mask for kiln: causality comes from the
    module's `is_causal` (or an `is_causal` kwarg), the window from `sliding_window`, and the
    batch layout from kiln's forward context."""
    if kwargs.get("position_bias") is not None:
        raise NotImplementedError(f"kiln attention does not support a position bias ({type(module).__name__})")
    if query.shape[0] != 1:
        raise RuntimeError("the Transformers backend runs flattened batches (batch dimension 1)")
    layer, _calls.next = _calls.next, _calls.next + 1
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else bool(causal)
    if _calls.probe is not None:
        _calls.probe.append((key.shape[1], key.shape[-1], value.shape[-1], causal, getattr(module, "layer_idx", None)))
        return query.new_zeros(1, query.shape[2], query.shape[1], value.shape[-1]), None
    window = int(sliding_window or 0)
    if window and not causal:  # HF keeps |q - k| < window; kiln's bidirectional window W keeps |q - k| <= W // 2
        window = 2 * (window - 1)
    sinks = kwargs.get("s_aux")  # attention sinks: GPT-OSS names them s_aux, others sinks
    sinks = kwargs.get("sinks") if sinks is None else sinks
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    out = ops.attention(q, k, v, layer, float(scale), window, causal, float(softcap or 0.0), sinks)
    return out[None], None


AttentionInterface.register(ATTN_IMPLEMENTATION, kiln_attention)


# Layer kinds (a config's `layer_types` / `layers_block_type`) that keep no state between steps
# beyond attention's keys and values; any other kind (mamba, conv, linear_attention, ...) carries
# a recurrent state that kiln's KV cache has no room for: such models run per sequence.
_STATELESS_LAYER_TYPES = {"full_attention", "sliding_attention", "chunked_attention", "attention", "mlp", "moe"}


# Architectures whose model class does not declare `_supports_attention_backend` though every
# attention of theirs goes through ALL_ATTENTION_FUNCTIONS with the interface's arguments: read in
# their modeling code, and held to HF's own outputs by the backend's parity sweep
# (tests/models/test_transformers_backend.py).
INTERFACE_WITHOUT_FLAG = frozenset({"StableLmForCausalLM"})


def check_backend_compatible(model_cls: type, architecture: str, config=None) -> None:
    compatible = getattr(model_cls, "_supports_attention_backend", False) or architecture in INTERFACE_WITHOUT_FLAG
    if not compatible:
        raise ValueError(
            f"{architecture} ({model_cls.__module__}.{model_cls.__name__}) cannot run on the Transformers backend: "
            f"its model class lacks `_supports_attention_backend = True` (its attention must go through "
            f"ALL_ATTENTION_FUNCTIONS with **kwargs passed down; see the supported-models page, 'Writing custom "
            f"models')")


def recurrent_layer_kinds(config) -> list[str]:
    """The kinds of the model's layers that keep a recurrent state ([] for attention-only models):
    from the config's layer types, or, for models without them (Mamba), from the layers of the
    cache transformers builds for the config."""
    from transformers.cache_utils import DynamicCache, LinearAttentionCacheLayerMixin

    text = config.get_text_config()
    kinds = {kind for field in ("layer_types", "layers_block_type") for kind in (getattr(text, field, None) or [])}
    recurrent = sorted(kinds - _STATELESS_LAYER_TYPES)
    if not recurrent:
        try:
            layers = DynamicCache(config=config).layers
        except Exception:  # a config the cache cannot read: attention-only as far as kiln can tell
            layers = []
        if any(isinstance(layer, LinearAttentionCacheLayerMixin) for layer in layers):
            recurrent = [getattr(text, "model_type", "recurrent")]
    return recurrent


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
    # True for models with recurrent layers: they run one sequence per forward, with transformers'
    # own attention (generation keeps per-request states: TransformersRecurrentForCausalLM)
    recurrent_state = False

    def __init__(self, hf_model: nn.Module, config):
        super().__init__()
        self.hf = hf_model
        self.config = config
        self.base = hf_model.get_decoder() if self.task == "generate" else getattr(hf_model, hf_model.base_model_prefix, hf_model)
        # kept for the tensor/pipeline-parallel work: how the model says to shard itself
        self.base_model_tp_plan = getattr(config, "base_model_tp_plan", None)
        self.base_model_pp_plan = getattr(config, "base_model_pp_plan", None)
        self._roberta_positions = "roberta" in config.model_type or config.model_type == "camembert"
        import inspect

        # models with token type embeddings get zeros when a prompt has none (GPT-2 takes the
        # argument too, but embeds it with its word embeddings: it gets nothing)
        params = inspect.signature(self.base.forward).parameters
        self._token_types = "token_type_ids" in params and bool(getattr(config.get_text_config(), "type_vocab_size", 0))
        self._no_cache = {"use_cache": False} if "use_cache" in params else {}  # kiln keeps the cache
        self.recurrent_state = self.recurrent_state or bool(recurrent_layer_kinds(config))
        self._layers = [] if self.recurrent_state else self._probe()
        if not self._layers and not self.recurrent_state:
            raise ValueError(f"{type(hf_model).__name__} made no call to the attention interface: the Transformers "
                             "backend needs attention layers that go through ALL_ATTENTION_FUNCTIONS")
        self.is_causal = all(layer[3] for layer in self._layers)

    @classmethod
    def load(cls, path: str, config, architecture: str, dtype: torch.dtype, device: torch.device,
             trust_remote_code: bool = False, shard=None) -> "_TransformersBase":
        """`shard` (tensor parallelism, frontend/sharding.py): slices the loaded model to one rank's
        part on the host, before it moves to the device."""
        # per-sequence models keep transformers' own attention (its cache holds their keys and values)
        recurrent = cls.recurrent_state or bool(recurrent_layer_kinds(config))
        attn = None if recurrent else ATTN_IMPLEMENTATION
        config._attn_implementation = attn
        hf_cls = hf_model_class(config, architecture, cls.task, trust_remote_code, path)
        if not recurrent:  # (per-sequence models do not use kiln's attention)
            check_backend_compatible(hf_cls, architecture, config)
        hf_model = hf_cls.from_pretrained(path, config=config, dtype=dtype, attn_implementation=attn,
                                          trust_remote_code=trust_remote_code)
        if shard is not None:
            shard.shard_loaded(hf_model)
        return cls(hf_model.to(device).eval(), config)

    @staticmethod
    def usable_positions(config) -> int:
        text = config.get_text_config()
        positions = getattr(text, "max_position_embeddings", None) or 2048
        if "roberta" in text.model_type or text.model_type == "camembert":
            positions -= text.pad_token_id + 1
        return positions

    @torch.inference_mode()
    def _probe(self) -> list[tuple[int, int, int, bool, int | None]]:
        """Run the model once over two tokens with an attention that only records, per call in
        order: (num_kv_heads, key head dim, value head dim, causal, the module's layer_idx or None).
        The KV cache is laid out from what the model does, whatever its config calls its sizes
        (latent attention, multi-query, per-layer head dims)."""
        device = next(self.hf.parameters()).device
        _calls.probe = []
        try:
            self(torch.zeros(2, dtype=torch.long, device=device), torch.arange(2, device=device))
            return _calls.probe
        finally:
            _calls.probe = None

    def kv_cache_layers(self) -> list[tuple[int, int, int]]:
        """Per attention call of a forward: (num_kv_heads, key head dim, value head dim)."""
        return [layer[:3] for layer in self._layers]

    def kv_scale_layers(self) -> list[int]:
        """Per KV-cache layer, the checkpoint layer whose KV scales it takes: the attention module's
        `layer_idx` (a model whose attention skips layers, or shares a layer's cache), else its call
        index."""
        return [layer[4] if layer[4] is not None else i for i, layer in enumerate(self._layers)]

    def kv_cache_spec(self) -> tuple[int, int, int]:
        heads, head_dim = max((h, max(k, v)) for h, k, v, *_ in self._layers)
        return len(self._layers), heads, head_dim

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, token_type_ids: torch.Tensor | None = None):
        if self.recurrent_state:  # pooling: each whole prompt its own forward, no state kept
            lens = get_forward_context().attn.query_lens
            types = token_type_ids.split(lens) if token_type_ids is not None else [None] * len(lens)
            return torch.cat([self._forward(*seq) for seq in zip(input_ids.split(lens), positions.split(lens), types)])
        return self._forward(input_ids, positions, token_type_ids)

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, token_type_ids: torch.Tensor | None = None):
        kwargs = {}
        if token_type_ids is not None or self._token_types:
            types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
            kwargs["token_type_ids"] = types[None]
        if self._roberta_positions:  # RoBERTa counts positions from the pad id + 1
            positions = positions + self.config.pad_token_id + 1
        _calls.next = 0
        out = self.base(input_ids=input_ids[None], position_ids=positions[None], **self._no_cache, **kwargs)
        return out[0][0]


# What HF heads do to the LM head's projection, by config field (Cohere's logit_scale, Granite's
# logits_scaling, Falcon-H1's muP lm_head_multiplier), applied in this order; then Gemma's soft-cap.
_LOGIT_SCALES = (("logit_scale", lambda x, s: x * s), ("logits_scaling", lambda x, s: x / s),
                 ("lm_head_multiplier", lambda x, s: x * s))


class TransformersForCausalLM(_TransformersBase):
    task = "generate"

    def __init__(self, hf_model, config):
        if hf_model.get_output_embeddings() is None:
            raise ValueError(f"{type(hf_model).__name__} has no LM head: to generate, a custom model's auto_map needs "
                             "an AutoModelForCausalLM entry")
        super().__init__(hf_model, config)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.hf.get_output_embeddings()(hidden)
        text = self.config.get_text_config()
        for field, apply in _LOGIT_SCALES:
            scale = getattr(text, field, None)
            if isinstance(scale, (int, float)) and scale != 1.0:
                logits = apply(logits, scale)
        cap = getattr(text, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()


class TransformersRecurrentForCausalLM(TransformersForCausalLM):
    """A model with recurrent layers: the runner calls `forward_sequence` once per scheduled
    sequence with that request's state, a transformers cache (conv and SSM / linear-attention
    states, and the attention layers' keys and values) made by `new_state`. kiln's KV cache holds
    nothing for it; its blocks only count tokens."""

    recurrent_state = True

    def new_state(self):
        from transformers.cache_utils import DynamicCache

        return DynamicCache(config=self.hf.config)

    def forward_sequence(self, input_ids: torch.Tensor, positions: torch.Tensor, state) -> torch.Tensor:
        """input_ids, positions [L] int64 (one sequence, continuing `state`) -> hidden [L, H]."""
        out = self.base(input_ids=input_ids[None], position_ids=positions[None], cache=state, use_cache=True)
        return out[0][0]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, token_type_ids=None):
        raise RuntimeError("a model with recurrent layers runs per sequence (forward_sequence), not as a flattened batch")


class TransformersRewardModel(TransformersForCausalLM):
    """convert="reward": the LM head's logits at every token, or at each step tag with a STEP
    pooler config (process reward models such as math-shepherd)."""

    default_pooling_type = "ALL"

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.compute_logits(pooled)


class TransformersEmbeddingModel(_TransformersBase):
    """The base model's hidden states; pooled from [CLS] for encoders, the last token for decoders."""

    task = "embed"

    @property
    def default_pooling_type(self) -> str:
        return "LAST" if self.is_causal else "CLS"


def _prediction_head(hf: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The transform some heads run before the classifier (ModernBERT's dense + act + norm `head`)."""
    head = getattr(hf, "head", None)
    return head(x) if isinstance(head, nn.Module) else x


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
        return hf.classifier(_prediction_head(hf, pooled))


class TransformersForTokenClassification(TransformersEmbeddingModel):
    task = "token_classify"
    default_pooling_type = "ALL"

    def __init__(self, hf_model, config):
        super().__init__(hf_model, config)
        self.num_labels = config.num_labels

    def head(self, rows: torch.Tensor) -> torch.Tensor:
        return self.hf.classifier(_prediction_head(self.hf, rows))


def backend_class(architecture: str, runner: str, convert: str, config=None) -> tuple[type, tuple[str, ...]]:
    """Which backend wrapper serves `architecture` for runner/convert, and its tasks."""
    recurrent = config is not None and bool(recurrent_layer_kinds(config))
    if runner == "generate":
        return (TransformersRecurrentForCausalLM if recurrent else TransformersForCausalLM), ("generate",)
    if convert == "reward":
        return TransformersRewardModel, ("reward",)
    if architecture.endswith("ForSequenceClassification") or convert == "classify":
        return TransformersForSequenceClassification, ("classify", "score")
    if architecture.endswith("ForTokenClassification"):
        return TransformersForTokenClassification, ("token_classify",)
    return TransformersEmbeddingModel, ("embed", "score")
