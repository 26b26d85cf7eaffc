"""The BERT family of encoders: BERT, RoBERTa and XLM-RoBERTa, as embedding and classification models.

One bidirectional post-norm encoder: embeddings (word + token type + absolute position, then
LayerNorm), then layers of self-attention and a GELU MLP, each followed by a residual add and
LayerNorm. The variants are data: RoBERTa and XLM-R number positions from `pad_token_id + 1`
(`position_offset`; so their longest sequence, `usable_positions`, is that much shorter than the
position table), and their sequence classification head is dense -> tanh -> out_proj on the
first token, where BERT runs its pooler (dense -> tanh on [CLS]) then `classifier`.

Module and parameter names are HF's, so checkpoints load by name; base models also take a
checkpoint saved with the head model's prefix (`bert.`, `roberta.`).
"""

from __future__ import annotations

import torch
from torch import nn

from kiln.ir import ops
from kiln.models.layers import Embedding, LayerNorm, Linear

ROBERTA_MODEL_TYPES = ("roberta", "xlm-roberta")


def position_offset(config) -> int:
    """What HF adds to a token's position in its sequence: RoBERTa and XLM-R count from pad_token_id + 1
    (HF picks the embedding code by `model_type`, so that is what decides here too)."""
    return config.pad_token_id + 1 if config.model_type in ROBERTA_MODEL_TYPES else 0


def usable_positions(config) -> int:
    """The longest sequence the position table serves: RoBERTa's first pad_token_id + 1 rows go unused."""
    return config.max_position_embeddings - position_offset(config)


def _check_config(config, max_positions: int | None) -> None:
    # Older BERT configs carry relative position variants HF has since dropped; kiln only has absolute.
    kind = getattr(config, "position_embedding_type", "absolute")
    if kind != "absolute":
        raise ValueError(f"position_embedding_type={kind!r} is not supported: only 'absolute'")
    if config.hidden_act not in ops.HF_ACTIVATIONS:
        raise ValueError(f"hidden_act={config.hidden_act!r} is not supported: one of {sorted(ops.HF_ACTIVATIONS)}")
    if max_positions is not None and max_positions > usable_positions(config):
        raise ValueError(f"max_positions={max_positions} exceeds the {usable_positions(config)} positions the model's "
                         f"position table serves (max_position_embeddings={config.max_position_embeddings})")


class BertEmbeddings(nn.Module):
    def __init__(self, config, position_offset: int):
        super().__init__()
        self.word_embeddings = Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.position_offset = position_offset

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings(positions + self.position_offset)
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.scale = self.head_dim**-0.5
        self.layer_idx = layer_idx
        self.query = Linear(config.hidden_size, config.hidden_size, bias=True)
        self.key = Linear(config.hidden_size, config.hidden_size, bias=True)
        self.value = Linear(config.hidden_size, config.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, E] -> [T, E]: every token attends to all tokens of its own sequence."""
        q = self.query(x).unflatten(-1, (self.num_heads, self.head_dim))
        k = self.key(x).unflatten(-1, (self.num_heads, self.head_dim))
        v = self.value(x).unflatten(-1, (self.num_heads, self.head_dim))
        return ops.attention(q, k, v, self.layer_idx, self.scale, 0, False).flatten(-2)


class BertOutput(nn.Module):
    """dense, then residual add and LayerNorm (post-norm): HF's BertSelfOutput and BertOutput."""

    def __init__(self, config, in_features: int):
        super().__init__()
        self.dense = Linear(in_features, config.hidden_size, bias=True)
        self.LayerNorm = LayerNorm(config.hidden_size, config.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.self = BertSelfAttention(config, layer_idx)
        self.output = BertOutput(config, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x), x)


class BertIntermediate(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.act = ops.HF_ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.activation(self.dense(x), self.act)


class BertLayer(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.attention = BertAttention(config, layer_idx)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config, config.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attention(x)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config, i) for i in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x)
        return x


class BertPooler(nn.Module):
    """dense -> tanh on each sequence's [CLS] row (the rows come already pooled)."""

    def __init__(self, config):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size, bias=True)

    def forward(self, cls_rows: torch.Tensor) -> torch.Tensor:
        return ops.activation(self.dense(cls_rows), "tanh")


class BertModel(nn.Module):
    """The encoder: input_ids [T], positions [T] (from 0 in each sequence) and token_type_ids [T] (default
    zeros) of a flattened batch -> hidden states [T, hidden_size].

    Served as an embedding model for BertModel, RobertaModel, XLMRobertaModel and RobertaForMaskedLM
    (the MLM head unused), and the `bert` / `roberta` base of the classification models.
    """

    default_pooling_type = "CLS"
    is_causal = False
    usable_positions = staticmethod(usable_positions)
    # A base model also loads a head model's checkpoint (RobertaForMaskedLM's, say): strip the prefix,
    # skip what an embedding model does not use. position_ids is a buffer older checkpoints saved.
    weight_prefix_map = {"bert.": "", "roberta.": ""}
    ignored_weights = ("embeddings.position_ids", "pooler.", "lm_head.")

    def __init__(self, config, architecture: str = "BertModel", max_positions: int | None = None,
                 add_pooling_layer: bool = False):
        super().__init__()
        _check_config(config, max_positions)
        self.config = config
        self.embeddings = BertEmbeddings(config, position_offset(config))
        self.encoder = BertEncoder(config)
        if add_pooling_layer:
            self.pooler = BertPooler(config)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        return self.encoder(self.embeddings(input_ids, positions, token_type_ids))


class BertForSequenceClassification(nn.Module):
    """BertModel, then on each sequence's [CLS] row: pooler (dense -> tanh) -> classifier."""

    default_pooling_type = "CLS"
    is_causal = False
    usable_positions = staticmethod(usable_positions)
    ignored_weights = ("embeddings.position_ids",)

    def __init__(self, config, architecture: str = "BertForSequenceClassification", max_positions: int | None = None):
        super().__init__()
        self.num_labels = config.num_labels
        self.bert = BertModel(config, architecture, max_positions, add_pooling_layer=True)
        self.classifier = Linear(config.hidden_size, config.num_labels, bias=True)

    def forward(self, input_ids, positions, token_type_ids=None):
        return self.bert(input_ids, positions, token_type_ids)

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled [N, hidden_size] ([CLS] rows) -> logits [N, num_labels]."""
        return self.classifier(self.bert.pooler(pooled))


class BertForTokenClassification(nn.Module):
    """BertModel, then `classifier` on every token."""

    default_pooling_type = "ALL"
    is_causal = False
    usable_positions = staticmethod(usable_positions)
    ignored_weights = ("embeddings.position_ids", "bert.pooler.")

    def __init__(self, config, architecture: str = "BertForTokenClassification", max_positions: int | None = None):
        super().__init__()
        self.num_labels = config.num_labels
        self.bert = BertModel(config, architecture, max_positions)
        self.classifier = Linear(config.hidden_size, config.num_labels, bias=True)

    def forward(self, input_ids, positions, token_type_ids=None):
        return self.bert(input_ids, positions, token_type_ids)

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled [N, hidden_size] (every token's row) -> logits [N, num_labels]."""
        return self.classifier(pooled)


class RobertaClassificationHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size, bias=True)
        self.out_proj = Linear(config.hidden_size, config.num_labels, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(ops.activation(self.dense(x), "tanh"))


class RobertaForSequenceClassification(nn.Module):
    """RoBERTa / XLM-R encoder, then on each sequence's first (<s>) row: dense -> tanh -> out_proj."""

    default_pooling_type = "CLS"
    is_causal = False
    usable_positions = staticmethod(usable_positions)
    ignored_weights = ("embeddings.position_ids", "roberta.pooler.")

    def __init__(self, config, architecture: str = "RobertaForSequenceClassification",
                 max_positions: int | None = None):
        super().__init__()
        self.num_labels = config.num_labels
        self.roberta = BertModel(config, architecture, max_positions)
        self.classifier = RobertaClassificationHead(config)

    def forward(self, input_ids, positions, token_type_ids=None):
        return self.roberta(input_ids, positions, token_type_ids)

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled [N, hidden_size] (<s> rows) -> logits [N, num_labels]."""
        return self.classifier(pooled)
