"""Tensor-parallel layers: what the loader swaps in (frontend/sharding.py) for the modules a model's
`tp_plan` shards "rowwise" or "vocab". Column-parallel linears need no module of their own: a
colwise linear is an ordinary linear over this rank's rows of the weight.

Each keeps the parameter names of the module it replaces, so checkpoint names still match.
"""

from __future__ import annotations

import torch
from torch import nn

from kiln.ir import ops


class RowParallelLinear(nn.Module):
    """A linear whose input features are split over the ranks: weight [out, in / N] holds this
    rank's columns; the partial products are summed with all_reduce and the bias (whole, [out])
    is added once, after the sum. x [..., in / N] -> [..., out], the same on every rank."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None):
        super().__init__()
        self.weight, self.bias = weight, bias

    @classmethod
    def from_linear(cls, linear: nn.Module) -> "RowParallelLinear":
        """Take over an (already sharded) linear's parameters: kiln's Linear or torch's nn.Linear."""
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = ops.all_reduce(ops.linear(x, self.weight))
        return out if self.bias is None else out + self.bias


class VocabParallelEmbedding(nn.Module):
    """An embedding whose rows (token ids) are split over the ranks: weight [V_pad / N, E] holds ids
    [start, start + V_pad / N) (the vocabulary padded to a multiple of N; padding rows are zero).
    Each rank looks up the ids it holds, zeroes the others, and all_reduce adds the ranks' rows:
    input_ids [T] int64 -> [T, E], the same on every rank."""

    def __init__(self, weight: nn.Parameter, start: int):
        super().__init__()
        self.weight, self.start = weight, start

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.start
        held = (local >= 0) & (local < self.weight.shape[0])
        rows = ops.embedding(torch.where(held, local, torch.zeros_like(local)), self.weight)
        return ops.all_reduce(rows.masked_fill(~held.unsqueeze(-1), 0))
