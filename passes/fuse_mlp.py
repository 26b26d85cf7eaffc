"""A gated MLP into one op with the add + RMSNorm before it, when the next layer's norm gemv (or
the model's final norm) reads its output: `add_rms_norm_linear` (gate/up) -> `act_and_mul_linear`
(down) -> an `add_rms_norm_linear[_rope]` or `add_rms_norm` whose input is down's output becomes
`add_rms_norm_mlp`, whose partial sums the reader is given as well.

Same numbers everywhere (the op's reference is the two ops in a row, and the reader sums the
partials of one row, which are then the output and zeros). What it buys is on the GPU: a batch-1
step's MLP is one launch (`kernels/fused_mlp.py`), with no boundary between gate/up and down, and
hands its output on as float32 partial sums that the next layer's q/k/v gemv reads in its prologue.
Session 33, H100: chains of 16 Llama-3.2-1B layers (MLP and the q/k/v gemv), 41.6 against 43.3 us a
layer (`benchmarks/mlp_chain.py`); the 1B step, 0.975-0.982 against 1.009-1.010 ms/token
(`benchmarks/decode_latency.py --rounds 8 --compare-mlp-fusion`).

What it takes:
- gate/up without bias, in 16-bit floats of widths the one launch takes (`fused_mlp.takes`), or,
  with eight_bit (off: it lost when timed, `fused_mlp.EIGHT_BIT`), 8-bit weight-only as the
  quantize pass (which runs before) leaves them: their scales go to the op, and down both
  transposed and as it was, for the GEMM of several rows;
- only MLPs whose output one such reader reads (a model's last MLP: its final norm, an
  `add_rms_norm`, whose one program reads the partial sums as cheaply as a row);
- at least two MLPs a forward (each launch zeroes the partial sums of the one before), or the pass
  leaves the graph alone.

Down's weight becomes a transposed copy, a graph constant cached on the parameter (the one launch
streams down's columns as rows), so the fused MLPs hold their down weights twice: about 0.5 GB more
for Llama-3.2-1B. The engine keeps `transposed_bytes` out of the KV cache's budget, which is sized
before the model is traced, and runs the pass with one_launch=False, which changes nothing, where
one-row linears do not run kiln's gemv (`float_gemv` off: no PDL, or asked). Runs last, after
fuse_linear_rope, which makes the q/k/v reader.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from kiln.ir.graph import Graph, is_kiln_op
from kiln.passes.fuse_norm_linear import hoist_before

NAME = "fuse_mlp"

_READERS = ("add_rms_norm_linear", "add_rms_norm_linear_rope", "add_rms_norm")
# The final norm as a reader (a model's last MLP fused too): on by default since session 34; off
# only to time it (`benchmarks/decode_latency.py --compare-switches mlp_final_norm=0`).
FINAL_NORM = True
# the position of a reader's partials argument (its last: after w_scale, and the rotary's for the rope op)
_PARTIALS_AT = {"add_rms_norm_linear": 7, "add_rms_norm_linear_rope": 14, "add_rms_norm": 4}


def _getitems(node: fx.Node) -> dict[int, fx.Node] | None:
    """{index: getitem node} of a tuple-valued node, or None when something else reads it."""
    items = {}
    for user in node.users:
        if user.target is not operator.getitem or user.args[1] in items:
            return None
        items[user.args[1]] = user
    return items


def _weight(graph: Graph, node) -> torch.Tensor | None:
    """A weight node's real tensor: a parameter (a graph input) or a constant a pass made (the
    quantize pass's 8-bit weights), else None."""
    if isinstance(node, fx.Node) and node.op == "get_attr":
        return getattr(graph.gm, node.target)
    return graph.example_value(node) if graph.is_parameter(node) else None


def _match(graph: Graph, down: fx.Node, eight_bit: bool) -> tuple | None:
    """(gate/up node, its getitems, the reader, down's weight) for an act_and_mul_linear that ends a
    fusable MLP."""
    from kiln.codegen.kernels.fused_mlp import takes

    if down.kwargs or len(down.args) != 5:
        return None
    gated, activation, weights, biases, down_scale = down.args
    w = _weight(graph, weights[0]) if len(weights) == 1 and not biases else None
    if w is None:
        return None
    # only what the one launch takes: elsewhere the op's one-row form would only add work (its
    # partial sums made from the output, and summed again by the reader)
    kinds = (torch.bfloat16, torch.float16) if down_scale is None else (torch.int8, torch.float8_e4m3fn)
    if w.dtype not in kinds or not takes(*w.shape) or (down_scale is not None and not eight_bit):
        return None
    if not (isinstance(gated, fx.Node) and gated.target is operator.getitem and gated.args[1] == 0
            and len(gated.users) == 1 and is_kiln_op(gated.args[0], "add_rms_norm_linear")):
        return None
    norm = gated.args[0]
    items = _getitems(norm)
    if items is None or norm.kwargs or len(norm.args) > 7 or norm.args[5]:
        return None
    gate_up_scale = norm.args[6] if len(norm.args) == 7 else None
    if (gate_up_scale is None) != (down_scale is None):
        return None  # (gate/up and down both float or both 8-bit)
    readers = list(down.users)
    if len(readers) != 1 or readers[0].kwargs or readers[0].args[0] is not down:
        return None
    reader = readers[0]
    if not any(is_kiln_op(reader, name) for name in _READERS) or len(reader.args) > _PARTIALS_AT[_name(reader)]:
        return None
    if _name(reader) == "add_rms_norm" and not FINAL_NORM:
        return None
    return norm, items, reader, w


def _name(node: fx.Node) -> str:
    return next(name for name in _READERS if is_kiln_op(node, name))


def transposed_bytes(model: torch.nn.Module, eight_bit: bool | None = None) -> int:
    """At most the bytes of the transposed copies this pass makes for a model: each gated MLP's
    (a module with gate_proj, up_proj and down_proj, as kiln's models name them) down weight of a
    dtype and shape the one launch takes. What the engine keeps out of the KV cache's budget, which
    is sized before the model is traced."""
    from kiln.codegen.kernels.fused_mlp import EIGHT_BIT, takes

    kinds = {torch.bfloat16, torch.float16} | ({torch.int8, torch.float8_e4m3fn} if (
        EIGHT_BIT if eight_bit is None else eight_bit) else set())
    total = 0
    for module in model.modules():
        down = getattr(getattr(module, "down_proj", None), "weight", None)
        if (isinstance(down, torch.Tensor) and hasattr(module, "gate_proj") and hasattr(module, "up_proj")
                and down.dim() == 2 and down.dtype in kinds and takes(*down.shape)):
            total += down.numel() * down.element_size()
    return total


def _transposed(param: torch.Tensor) -> torch.Tensor:
    """param.T, contiguous: made once a weight (every graph of the model shares it)."""
    cached = param.__dict__.get("_kiln_transposed")
    if cached is None or cached.shape != param.shape[::-1]:
        cached = param.detach().t().contiguous()
        param.__dict__["_kiln_transposed"] = cached
    return cached


def run(graph: Graph, one_launch: bool = True, eight_bit: bool | None = None) -> Graph:
    """one_launch=False (the engine's, where one-row linears do not run kiln's gemv) leaves the graph
    as it is. eight_bit (default `fused_mlp.EIGHT_BIT`, off: it lost when timed): fuse weight-only 8-bit
    MLPs too."""
    from kiln.codegen.kernels.fused_mlp import EIGHT_BIT

    if not one_launch:
        return graph
    eight_bit = EIGHT_BIT if eight_bit is None else eight_bit
    g = graph.graph
    order = {n: i for i, n in enumerate(g.nodes)}
    # Last first: an MLP whose reader is a later fused MLP's norm would hand its partial sums to an op
    # that does not read them, so it stays as it is.
    matches, fused_norms = [], set()
    for down in reversed(list(graph.calls("act_and_mul_linear"))):
        m = _match(graph, down, eight_bit)
        if m is not None and m[2] not in fused_norms:
            matches.insert(0, (down, m))
            fused_norms.add(m[0])
    if len(matches) < 2:
        return graph
    for slot, (down, (norm, items, reader, w)) in enumerate(matches):
        x, residual, norm_weight, eps, weights = norm.args[:5]
        _, activation, (down_w,), _, down_scale = down.args
        down_t = graph.constant(_transposed(w), norm, "_kiln_down_t")
        args = (x, residual, norm_weight, eps, weights, activation, down_t, slot, len(matches))
        if down_scale is not None:  # 8-bit: the scales, and down as it was for the GEMM of several rows
            # (the quantize pass puts 8-bit weights right before their linear: moved up to the norm)
            if not hoist_before([down_w, down_scale], norm, order):
                raise AssertionError("fuse_mlp: down's 8-bit weight is made by the forward")
            args += (norm.args[6], down_scale, down_w)
        with g.inserting_after(norm):
            mlp = g.call_function(torch.ops.kiln.add_rms_norm_mlp.default, args)
        out, summed, partials = (graph.getitem(mlp, i) for i in range(3))
        out.meta["example_value"] = down.meta.get("example_value")
        if 1 in items:
            summed.meta["example_value"] = items[1].meta.get("example_value")
            items[1].replace_all_uses_with(summed)
        down.replace_all_uses_with(out)
        args = list(reader.args)
        args += [None] * (_PARTIALS_AT[_name(reader)] - len(args))  # the defaults before partials (w_scale)
        reader.args = (*args, partials)
    return graph.finish()
