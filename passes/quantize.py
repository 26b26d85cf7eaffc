"""Quantization: `linear` (and `merged_linear`, and the `F.linear` of Transformers-backend models)
becomes a quantized GEMM. The model code never changes.

Two sources of 8-bit weights:
- an 8-bit parameter with a `WeightQuant` (kind, per-channel scale, whether activations are
  quantized) as `param.kiln_quant`: what the loader makes of a pre-quantized checkpoint, and what
  the engine makes of every weight this pass would rewrite when `LLM(quantization=...)` asks
  (frontend/quantization.py, at load, so that no float copy stays allocated). Such a weight is
  rewritten whatever `scheme` says; the graph constant is the parameter itself.
- `scheme` for a float weight: "int8" / "fp8" quantize weights and activations (W8A8, `quantize`
  per token + `scaled_linear`); "int8_weight_only" / "fp8_weight_only" quantize weights only
  (`weight_only_linear`). Weights get one symmetric scale per output channel, computed here from
  the real parameter the graph input stands for, into a copy: the float parameter stays (the
  engine leaves only weights read another way too in float, such as an LM head tied to the
  embedding; graphs built outside the engine, as in the tests, take this path for every weight).

The quantized weight and its scale become constants of the graph (get_attr). Quantized forms are
cached per parameter, so the recompiles torch.compile does for new shapes share one.

`lm_head=True` also rewrites `logits` (the output projection, 0.5 GB of a 1B model's 2.5 GB) into
a weight-only GEMM. Off by default, as in vLLM: the last projection is the most sensitive one.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from kiln.ir import ops
from kiln.ir.graph import Graph, is_kiln_op
from kiln.ir.quant_ops import SCHEMES, WeightQuant, quantize_weight

NAME = "quantize"
_ATEN_LINEAR = (torch._C._nn.linear, torch.nn.functional.linear)


def run(graph: Graph, scheme: str | None = None, lm_head: bool = False) -> Graph:
    if scheme is not None and scheme not in SCHEMES:
        raise ValueError(f"quantization={scheme!r} is not supported; use one of {', '.join(SCHEMES)}")
    rewriter = _Rewriter(graph, scheme)
    for node in list(graph.graph.nodes):
        if node.op != "call_function":
            continue
        if is_kiln_op(node, "linear") or node.target in _ATEN_LINEAR:
            x, weight = node.args[0], node.args[1]
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            rewriter.linear(node, x, [weight], [bias] if bias is not None else [])
        elif is_kiln_op(node, "merged_linear"):
            rewriter.linear(node, *node.args)
        elif is_kiln_op(node, "logits"):
            rewriter.logits(node, lm_head)
    return graph.finish()


class _Rewriter:
    def __init__(self, graph: Graph, scheme: str | None):
        self.graph, self.scheme = graph, scheme
        self.quantized_inputs: dict[tuple[fx.Node, str], tuple[fx.Node, fx.Node]] = {}

    def weight(self, weights: list[fx.Node], activations_default: bool) -> WeightQuant | None:
        """The quantized form of these (sibling) weights, or None to leave the GEMM alone."""
        if not all(self.graph.is_parameter(w) for w in weights):
            return None
        params = [self.graph.example_value(w) for w in weights]
        given = [getattr(p, "kiln_quant", None) for p in params]
        if any(given):
            if not all(given) or len({(q.kind, q.activations) for q in given}) != 1:
                raise ValueError("sibling linears merged into one GEMM mix quantized and unquantized weights")
            kind, activations = given[0].kind, given[0].activations
        elif self.scheme is None:
            return None
        else:
            kind, activations = SCHEMES[self.scheme]
            activations = activations and activations_default
        key = (kind, activations, tuple((p.data_ptr(), tuple(p.shape)) for p in params))
        # kept on the first parameter, so every graph of the model (recompiles included) shares one copy
        cached = params[0].__dict__.setdefault("_kiln_quantized", {})
        if key not in cached:
            if any(given):  # already 8-bit: just one [N, K] matrix and one scale vector
                cached[key] = WeightQuant(kind, torch.cat([q.scale for q in given]), activations,
                                          ops._adjacent([p.detach() for p in params]))
            else:
                data, scale = quantize_weight(ops._adjacent([p.detach() for p in params]), kind)
                cached[key] = WeightQuant(kind, scale, activations, data)
        return cached[key]

    def constant(self, tensor: torch.Tensor, before: fx.Node) -> fx.Node:
        return self.graph.constant(tensor, before, "_kiln_quant")

    def linear(self, node: fx.Node, x: fx.Node, weights: list[fx.Node], biases: list) -> None:
        quant = self.weight(list(weights), activations_default=True)
        if quant is None:
            return
        g = self.graph.graph
        wq, scale = self.constant(quant.data, node), self.constant(quant.scale, node)
        bias = None
        if biases:
            if not all(self.graph.is_parameter(b) for b in biases):
                return
            values = [self.graph.example_value(b).detach() for b in biases]
            bias = biases[0] if len(biases) == 1 else self.constant(ops._adjacent(values), node)
        with g.inserting_before(node):
            if quant.activations:
                xq, x_scale = self.quantized_input(x, quant.kind, node)
                out_dtype = self.graph.example_value(x).dtype
                new = g.call_function(torch.ops.kiln.scaled_linear.default, (xq, x_scale, wq, scale, bias, out_dtype))
            else:
                new = g.call_function(torch.ops.kiln.weight_only_linear.default, (x, wq, scale, bias))
        node.replace_all_uses_with(new)

    def quantized_input(self, x: fx.Node, kind: str, before: fx.Node) -> tuple[fx.Node, fx.Node]:
        """One `quantize` per (input, kind): unmerged siblings share it."""
        if (x, kind) not in self.quantized_inputs:
            g = self.graph.graph
            with g.inserting_before(before):
                both = g.call_function(torch.ops.kiln.quantize.default, (x, kind))
                self.quantized_inputs[(x, kind)] = (g.call_function(operator.getitem, (both, 0)),
                                                    g.call_function(operator.getitem, (both, 1)))
        return self.quantized_inputs[(x, kind)]

    def logits(self, node: fx.Node, lm_head: bool) -> None:
        hidden, weight = node.args[0], node.args[1]
        if not self.graph.is_parameter(weight):
            return
        prequantized = getattr(self.graph.example_value(weight), "kiln_quant", None) is not None
        if not (prequantized or (lm_head and self.scheme is not None)):
            return
        quant = self.weight([weight], activations_default=False)
        quant = WeightQuant(quant.kind, quant.scale, False, quant.data)  # the output projection stays weight-only
        g = self.graph.graph
        wq, scale = self.constant(quant.data, node), self.constant(quant.scale, node)
        with g.inserting_before(node):
            out = g.call_function(torch.ops.kiln.weight_only_linear.default, (hidden, wq, scale, None))
            new = g.call_method("float", (out,))
        node.replace_all_uses_with(new)
