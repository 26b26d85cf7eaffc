"""Tensor-parallel sharding: one rank's share of a model split over N ranks.

A model declares how it splits as data, `tp_plan`: module-name pattern -> style, matched against
the end of each module's name (`fnmatch`, `*` for a layer index), as transformers' own
`base_model_tp_plan`, which the Transformers backend reads. The styles:

- "colwise": a linear's output features (weight rows, bias) split; each rank computes its slice
  of the output (q/k/v by heads, gate/up by intermediate features). No communication.
- "rowwise": a linear's input features (weight columns) split; each rank's partial product is
  summed by `ops.all_reduce`, then the whole bias added once (o_proj, down_proj).
- "vocab": an embedding's or LM head's rows (token ids) split, the vocabulary padded to a
  multiple of N; the embedding masks the ids other ranks hold and all_reduces, the head's logits
  are gathered (`ops.all_gather`) by the runner.

A colwise-then-rowwise pair (attention, MLP) costs one all_reduce, and the KV cache shards by KV
heads for free: each rank builds its model from the config's rank-local view (heads, KV heads and
intermediate size divided by N), so its attention layers hold 1/N of the heads.

Native models are sharded while loading: built on the meta device from the local view, their
rowwise and vocab modules swapped for models/parallel.py's, and each checkpoint tensor sliced to
the rank's part before it is copied in (`load_model(..., shard=)`). The Transformers backend loads
through `from_pretrained`, which owns weight names, tying and buffers, so there the loaded model is
sliced in place on the host (`shard_loaded`) before it moves to the device.
"""

from __future__ import annotations

import copy
from fnmatch import fnmatchcase

import torch
from torch import nn

from kiln.models.parallel import RowParallelLinear, VocabParallelEmbedding

COLWISE, ROWWISE, VOCAB, REPLICATED = "colwise", "rowwise", "vocab", "replicated"

# transformers' plan styles kiln serves (the last is the LM head's, in a CausalLM class's `_tp_plan`)
_HF_STYLES = {"colwise": COLWISE, "rowwise": ROWWISE, "replicated_with_grad_allreduce": REPLICATED,
              "colwise_gather_output": VOCAB}

# The config fields a plan divides: rank-local heads, KV heads and MLP width.
DIVIDED_FIELDS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")


def tp_plan(model_cls: type, config, architecture: str) -> dict[str, str]:
    """The model's plan in kiln's styles: a native class's `tp_plan`, or for the Transformers backend
    the config's `base_model_tp_plan` plus the HF class's head plan. ValueError when there is none,
    or it uses a style kiln does not serve."""
    plan = getattr(model_cls, "tp_plan", None)
    if plan is not None:
        return dict(plan)
    if not hasattr(model_cls, "load"):
        raise ValueError(f"{architecture} ({model_cls.__name__}) declares no tp_plan: it cannot run with "
                         "tensor_parallel_size > 1")
    hf_plan = dict(getattr(config.get_text_config(), "base_model_tp_plan", None) or {})
    if not hf_plan:
        raise ValueError(f"{architecture} has no base_model_tp_plan in its transformers config: the Transformers "
                         "backend cannot shard it (tensor_parallel_size > 1)")
    import transformers

    hf_plan.update(getattr(getattr(transformers, architecture, None), "_tp_plan", None) or {})
    unknown = {p: s for p, s in hf_plan.items() if s not in _HF_STYLES}
    if unknown:
        raise ValueError(f"{architecture}'s tensor-parallel plan uses {unknown}: kiln shards the Transformers backend "
                         f"with the styles {', '.join(_HF_STYLES)} only")
    return {pattern: _HF_STYLES[style] for pattern, style in hf_plan.items()}


def check_divisible(config, world_size: int, model_cls: type | None = None) -> None:
    """ValueError unless N divides every field the plan splits (naming the field and N): the
    config's DIVIDED_FIELDS, and the sizes a native model splits beyond them (`tp_sizes(config)`:
    name -> global size, e.g. Falcon's KV heads, BLOOM's MLP width, which its config names otherwise
    or not at all)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    sizes = {field: getattr(text, field, None) for field in DIVIDED_FIELDS}
    if sizes["num_key_value_heads"] is None:
        sizes["num_key_value_heads"] = text.num_attention_heads
    if model_cls is not None and hasattr(model_cls, "tp_sizes"):
        sizes.update(model_cls.tp_sizes(text))
    for field, value in sizes.items():
        if value is not None and value % world_size:
            hint = " (kiln does not replicate KV heads over ranks yet)" if "key_value" in field or "KV" in field else ""
            raise ValueError(f"tensor_parallel_size={world_size} does not divide the model's {field}={value}: each "
                             f"rank holds {field} / tensor_parallel_size{hint}")


class Shard:
    """Rank `rank` of `world_size`: which modules split (the plan), the model's rank-local config,
    the module swaps, and the checkpoint slicing."""

    def __init__(self, plan: dict[str, str], rank: int, world_size: int):
        self.plan, self.rank, self.world_size = plan, rank, world_size
        self.gathers_logits = False  # whether the LM head is vocab-parallel: logits need an all_gather
        self.vocab_size = 0  # the head's rows before padding (the gathered logits' width)

    def style(self, module_name: str) -> str | None:
        for pattern, style in self.plan.items():
            if fnmatchcase(module_name, pattern) or fnmatchcase(module_name, "*." + pattern):
                return style
        return None

    def local_config(self, config):
        """The config this rank builds its model from: DIVIDED_FIELDS / N, head_dim pinned, and
        `tp_rank` / `tp_size` for what a model derives per rank itself (sizes its config does not
        name as DIVIDED_FIELDS, BLOOM's ALiBi slopes of its own heads)."""
        local = copy.deepcopy(config)
        local.tp_rank, local.tp_size = self.rank, self.world_size
        if getattr(local, "head_dim", None) is None:
            local.head_dim = config.hidden_size // config.num_attention_heads
        if getattr(local, "num_key_value_heads", None) is None:
            local.num_key_value_heads = config.num_attention_heads
        for field in DIVIDED_FIELDS:
            if getattr(local, field, None) is not None:
                setattr(local, field, getattr(local, field) // self.world_size)
        return local

    # ------------------------------------------------------------ native models (on the meta device)

    def prepare(self, model: nn.Module) -> None:
        """Swap in the tensor-parallel modules the plan names: rowwise linears for
        RowParallelLinear, vocab embeddings for VocabParallelEmbedding, a vocab head for its rows.
        (Colwise linears already have their local shape, from the local config.)"""
        for name, module in list(model.named_modules()):
            style = self.style(name)
            if style == ROWWISE:
                _replace(model, name, RowParallelLinear.from_linear(module))
            elif style == VOCAB:
                weight = module.weight
                start, rows = self._vocab_rows(weight.shape[0])
                local = nn.Parameter(weight.new_empty((rows, *weight.shape[1:])), requires_grad=False)
                if isinstance(module, nn.Embedding) or not hasattr(module, "bias"):  # an embedding
                    _replace(model, name, VocabParallelEmbedding(local, start))
                else:
                    module.weight = local
                self.vocab_size = weight.shape[0]
        # a native plan shards the head with the embedding (tied) or as lm_head
        self.gathers_logits = VOCAB in self.plan.values()

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Checkpoint tensor `name` (model naming) -> this rank's part of it."""
        module, _, kind = name.rpartition(".")
        style = self.style(module)
        return tensor if style in (None, REPLICATED) else self._slice(style, kind, tensor, name)

    # ------------------------------------------------------------ the Transformers backend (loaded, on the host)

    def shard_loaded(self, model: nn.Module) -> None:
        """Slice a loaded HF model in place: colwise linears keep their rows, rowwise ones their
        columns (and become RowParallelLinear), the LM head its vocabulary rows."""
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        for name, module in list(model.named_modules()):
            style = self.style(name)
            if style in (None, REPLICATED):
                continue
            if not isinstance(module, nn.Linear) or (style == VOCAB and module is not head):
                raise ValueError(f"the plan shards {name} ({type(module).__name__}) {style}: the Transformers backend "
                                 "shards linear layers and the LM head only")
            with torch.no_grad():
                if style == VOCAB:
                    self.vocab_size, self.gathers_logits = module.weight.shape[0], True
                weight = self._slice(style, "weight", module.weight.detach(), f"{name}.weight")
                module.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
                if module.bias is not None:
                    bias = self._slice(style, "bias", module.bias.detach(), f"{name}.bias")
                    module.bias = nn.Parameter(bias.contiguous(), requires_grad=False)
            module.out_features, module.in_features = module.weight.shape
            if style == ROWWISE:
                _replace(model, name, RowParallelLinear.from_linear(module))

    # ------------------------------------------------------------ slicing

    def _vocab_rows(self, vocab: int) -> tuple[int, int]:
        """(first id, rows) of this rank's part of a vocabulary padded to a multiple of N."""
        rows = -(-vocab // self.world_size)
        return self.rank * rows, rows

    def _slice(self, style: str, kind: str, tensor: torch.Tensor, name: str) -> torch.Tensor:
        n, r = self.world_size, self.rank
        if kind != "weight" and tensor.numel() == 1:
            return tensor  # a per-tensor scale of an 8-bit weight holds for every slice of it
        if style == VOCAB:
            start, rows = self._vocab_rows(tensor.shape[0])
            part = tensor[start:start + rows]
            if part.shape[0] < rows:  # the last rank's padding: zero rows, never looked up, logits cut off
                part = torch.cat([part, part.new_zeros((rows - part.shape[0], *tensor.shape[1:]))])
            return part
        dim = 1 if style == ROWWISE and kind == "weight" else 0
        if style == ROWWISE and kind != "weight":
            return tensor  # a rowwise bias is added once, whole, after the all_reduce
        if tensor.shape[dim] % n:
            raise ValueError(f"{name} has {tensor.shape[dim]} {'columns' if dim else 'rows'}, which "
                             f"tensor_parallel_size={n} does not divide")
        size = tensor.shape[dim] // n
        return tensor.narrow(dim, r * size, size)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
