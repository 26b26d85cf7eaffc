"""On-the-fly quantization at load (frontend/quantization.py): which weights become 8-bit — those
the traced code passes as the weight of a linear and reads in no other way — and how."""

from __future__ import annotations

import torch
from torch import nn

from kiln.frontend.loader import lay_out_adjacent
from kiln.frontend.quantization import quantize_weights, weight_uses
from kiln.ir import ops
from kiln.ir.quant_ops import quantize_weight
from kiln.models.layers import Embedding, Linear

D, V = 16, 24


class Toy(nn.Module):
    """q/k (siblings laid out back to back), a torch nn.Linear, a weight the forward slices, an
    embedding tied to the LM head, and a pooling head that runs eagerly."""

    adjacent_weights = (("q", "k"),)

    def __init__(self):
        super().__init__()
        self.embed = Embedding(V, D)
        self.q, self.k, self.score = Linear(D, D), Linear(D, D // 2), Linear(D, 2)
        self.proj = nn.Linear(D + D // 2, D)
        self.table = nn.Parameter(torch.empty(2 * D, D), requires_grad=False)
        for p in self.parameters():
            nn.init.normal_(p)

    def forward(self, input_ids, positions):
        x = self.embed(input_ids)
        h = self.proj(torch.cat((self.q(x), self.k(x)), -1))
        return h + ops.linear(x, self.table[:D])  # a slice: not a parameter the pass can rewrite

    def compute_logits(self, hidden):
        return ops.logits(hidden, self.embed.weight)

    def head(self, pooled):
        return self.score(pooled)


def fresh_toy() -> Toy:
    torch.manual_seed(0)
    toy = Toy().eval()
    lay_out_adjacent(toy)
    return toy


def test_weight_uses_names_linear_weights_and_everything_else():
    toy = fresh_toy()
    roles = {id(p): r for p, r in weight_uses(toy)}
    by_name = {n: roles[id(p)] for n, p in toy.named_parameters() if id(p) in roles}
    assert by_name == {"q.weight": {"linear"}, "k.weight": {"linear"}, "proj.weight": {"linear"},
                       "embed.weight": {"other", "logits"}, "table": {"other"}, "score.weight": {"eager"}}


def test_quantize_weights_makes_linear_weights_8bit_in_place_and_keeps_siblings_adjacent():
    toy = fresh_toy()
    want = {n: quantize_weight(p.detach(), "int8") for n, p in toy.named_parameters() if p.dim() == 2}
    floats = {n: p.detach().clone() for n, p in toy.named_parameters()}
    freed, made = quantize_weights(toy, "int8", lm_head=True)
    params = dict(toy.named_parameters())
    quantized = {"q.weight", "k.weight", "proj.weight"}
    assert {n for n, p in params.items() if p.dtype == torch.int8} == quantized
    for name in quantized:
        data, scale = want[name]
        assert torch.equal(params[name], data) and torch.equal(params[name].kiln_quant.scale, scale)
        assert params[name].kiln_quant.activations  # "int8" is W8A8
    for name in set(params) - quantized:  # the tied embedding, the sliced table, the eager head, biases
        assert torch.equal(params[name], floats[name])
    assert freed == 4 * made == 4 * sum(params[n].numel() for n in quantized)
    q, k = params["q.weight"], params["k.weight"]
    assert ops._adjacent([q, k]).data_ptr() == q.data_ptr()  # merged_linear reads them without a copy


def test_weights_stay_float_when_the_code_cannot_run_on_fake_tensors():
    class DataDependent(Toy):
        def forward(self, input_ids, positions):
            if self.q(self.embed(input_ids)).sum() > 0:  # a Python branch on a value
                return self.embed(input_ids)
            return -self.embed(input_ids)

    toy = DataDependent().eval()
    assert weight_uses(toy) is None
    assert quantize_weights(toy, "int8_weight_only") == (0, 0)
    assert all(p.dtype == torch.float32 for p in toy.parameters())
