"""8-bit weights in the model: read from a pre-quantized checkpoint, or made at load.

Either way a quantized weight is an 8-bit parameter (int8 or float8_e4m3fn) with a `WeightQuant`
(kind, per-channel scale, whether activations are quantized) as `param.kiln_quant`, which the
quantize pass turns into a quantized GEMM; no float copy of it stays allocated.

On-the-fly quantization (`LLM(quantization=...)`, `quantize_weights`) converts, once the model is
loaded, the weights the quantize pass would rewrite: those the traced code passes, as themselves,
as the weight of a `linear` (or of `logits` with `lm_head=True`) and reads in no other way. Which
ones those are is found by running the traced methods once on fake tensors (`weight_uses`).

Pre-quantized checkpoints: what `quantization_config` in config.json says about the weights, read
here and used by the loader. Two layouts, as the checkpoints on the supported-models page ship them:

- "fp8" (vLLM's / AutoFP8's): `x.weight` float8_e4m3fn, `x.weight_scale` (one per tensor),
  `x.input_scale` (static activation scale) when `activation_scheme` is "static".
- "compressed-tensors" with 8-bit symmetric weights (float or int, per tensor or per channel),
  activations either unquantized (weight-only) or quantized 8-bit (W8A8).

Activations of W8A8 layers are quantized per token with a dynamic scale in both cases: a static
`input_scale` is read past (per-token scales are at least as accurate, and need no calibration).
Block-wise, grouped, 4-bit and asymmetric schemes are refused by name.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from kiln.ir.quant_ops import QUANT_DTYPES, SCHEMES, WeightQuant, quantize_weight

logger = logging.getLogger("kiln")

SUPPORTED = "fp8 (per-tensor or per-channel weight scales), compressed-tensors (8-bit symmetric, tensor/channel)"


@dataclass
class CheckpointQuant:
    method: str  # "fp8" | "compressed-tensors"
    kind: str  # "fp8" | "int8"
    activations: bool  # W8A8 (True) or weight-only


def checkpoint_quantization(hf_config) -> CheckpointQuant | None:
    """The checkpoint's quantization, or None; a clear error for schemes kiln does not run."""
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    method = qc.get("quant_method")
    if method == "fp8":
        if qc.get("weight_block_size"):
            raise ValueError(f"block-wise fp8 (weight_block_size={qc['weight_block_size']}) is not supported; "
                             f"supported: {SUPPORTED}")
        return CheckpointQuant("fp8", "fp8", True)
    if method == "compressed-tensors":
        schemes = set()
        for name, group in (qc.get("config_groups") or {}).items():
            schemes.add((_tensor_scheme(name, "weights", group.get("weights")),
                         _tensor_scheme(name, "input_activations", group.get("input_activations"))))
        if len(schemes) != 1:
            raise ValueError(f"compressed-tensors checkpoint with {len(schemes)} different schemes in config_groups; "
                             "kiln runs one 8-bit scheme per checkpoint")
        (weights, activations), = schemes
        if weights is None:
            raise ValueError("compressed-tensors config_groups quantize no weights")
        if activations is not None and activations != weights:
            raise ValueError(f"compressed-tensors: {weights} weights with {activations} activations are not supported")
        return CheckpointQuant("compressed-tensors", weights, activations is not None)
    raise ValueError(f"quantization method {method!r} in config.json is not supported; supported: {SUPPORTED}")


def _tensor_scheme(group: str, role: str, args: dict | None) -> str | None:
    """'fp8' / 'int8' for an 8-bit symmetric scheme kiln runs, None for no quantization."""
    if not args:
        return None
    bits, kind, strategy = args.get("num_bits"), args.get("type", "int"), args.get("strategy", "tensor")
    allowed = ("tensor", "channel") if role == "weights" else ("tensor", "token")
    if bits != 8 or kind not in ("float", "int") or strategy not in allowed or not args.get("symmetric", True):
        raise ValueError(f"compressed-tensors {group}.{role}: {bits}-bit {kind}, strategy {strategy!r}, "
                         f"symmetric={args.get('symmetric', True)} is not supported; supported: {SUPPORTED}")
    return "fp8" if kind == "float" else "int8"


def is_quantized_tensor(tensor: torch.Tensor) -> bool:
    return tensor.dtype in (torch.float8_e4m3fn, torch.int8)


def attach_scales(params: dict[str, torch.nn.Parameter], quantized: set[str], scales: dict[str, torch.Tensor],
                  quant: CheckpointQuant) -> None:
    """Give every 8-bit weight its `kiln_quant`: the scale widened to one per output channel."""
    stray = sorted(set(scales) - quantized)
    if stray:
        raise ValueError(f"checkpoint has weight_scale for {stray[:3]} whose weights are not 8-bit")
    for name in sorted(quantized):
        if name not in scales:
            raise ValueError(f"8-bit checkpoint weight {name!r} has no {name}_scale")
        param, scale = params[name], scales[name].float().flatten()
        rows = param.shape[0]
        if scale.numel() == 1:
            scale = scale.expand(rows).clone()
        elif scale.numel() != rows:
            raise ValueError(f"{name}_scale has {scale.numel()} values for {rows} output channels: only per-tensor "
                             f"and per-channel scales are supported ({SUPPORTED})")
        param.kiln_quant = WeightQuant(quant.kind, scale.to(param.device), quant.activations)


# ---------------------------------------------------------------- on-the-fly quantization


def quantize_weights(model: nn.Module, scheme: str, lm_head: bool = False) -> tuple[int, int]:
    """Quantize, in place, the weights the quantize pass will rewrite (see `weight_uses`): each
    becomes 8-bit with its per-channel symmetric scale, computed from its float values exactly as
    the pass would, and its float storage is freed. Linear weights get `scheme`'s activations (W8A8
    or weight-only); the LM head (`lm_head=True`, the `quantize_lm_head` option) is weight-only.
    Siblings laid out back to back (q/k/v, gate/up) stay back to back, so merge_linears' single
    GEMM still reads them without a copy. Weights left in float (an embedding tied to the LM head,
    a head that runs eagerly) are the pass's to quantize into graph constants, as before.
    Returns (bytes of float weights freed, bytes of 8-bit weights made)."""
    kind, activations = SCHEMES[scheme]
    uses = weight_uses(model)
    if uses is None:
        return 0, 0
    linears = [p for p, roles in uses if roles == {"linear"}]
    heads = [p for p, roles in uses if roles == {"logits"}] if lm_head else []
    before = sum(p.numel() * p.element_size() for p in linears + heads)
    for params, act in ((linears, activations), (heads, False)):
        for run in _back_to_back(params):
            _to_8bit(run, kind, act)
    return before, sum(p.numel() * p.element_size() for p in linears + heads)


def weight_uses(model: nn.Module) -> list[tuple[nn.Parameter, set[str]]] | None:
    """How the code that gets traced uses each 2-D float (16 or 32-bit) parameter: {"linear"} for the weight
    of a `linear` (kiln's op or torch's F.linear, whose bias is a parameter or None), {"logits"}
    for the LM head `logits` reads; "other" for any other read (an embedding lookup, a slice, a
    dtype) and "eager" for any read by the pooling `head`, which runs outside the graph. Found by
    running `forward` (two tokens), `compute_logits` and `head` once on fake tensors, kiln ops
    through their fake implementations and with `torch.compiler.is_compiling()` true, as under
    torch.compile. None when the model's code cannot run that way (nothing is then quantized at load)."""
    recorder = _WeightUses()
    device = next(model.parameters()).device
    try:
        with torch.no_grad(), _as_if_compiling(), FakeTensorMode(allow_non_fake_inputs=True):
            with recorder:
                hidden = model(torch.zeros(2, dtype=torch.long, device=device), torch.arange(2, device=device))
                try:
                    model.compute_logits(hidden)
                except AttributeError:  # no LM head (a pooling model's): nothing traced reads one
                    pass
                recorder.role = "eager"
                if hasattr(model, "head"):
                    model.head(hidden)
    except Exception as e:  # (an HF model whose code needs real values): the pass quantizes copies instead
        logger.warning("kiln: %s's weights stay in float until the quantize pass makes 8-bit copies of them: "
                       "running its code on fake tensors failed (%s: %s)", type(model).__name__, type(e).__name__, e)
        return None
    return [(p, recorder.roles[id(p)]) for p in model.parameters()  # (8-bit ones came so from the checkpoint)
            if id(p) in recorder.roles and p.dim() == 2 and p.is_floating_point() and p.element_size() > 1]


@contextlib.contextmanager
def _as_if_compiling():
    """`torch.compiler.is_compiling()` true, as while torch.compile traces: kiln ops then go through
    their custom op (the fake implementation, under fake tensors), and HF code takes the branches
    it takes when traced. (The flag torch.export's non-strict tracing sets.)"""
    old = torch.compiler._is_compiling_flag
    torch.compiler._is_compiling_flag = True
    try:
        yield
    finally:
        torch.compiler._is_compiling_flag = old


# reads of a parameter that depend only on its shape and place: not a use of its values or dtype
_METADATA = {"shape", "device", "ndim", "is_cuda", "is_meta", "layout", "requires_grad", "size", "dim", "numel",
             "stride", "is_contiguous", "storage_offset", "__len__"}
_LINEARS = (torch.ops.kiln.linear.default, torch._C._nn.linear, F.linear)


class _WeightUses(TorchFunctionMode):
    """Per parameter (by id), the roles it was passed in (see `weight_uses`)."""

    def __init__(self):
        super().__init__()
        self.roles: dict[int, set[str]] = {}
        self.role: str | None = None  # set to "eager" while the eager head runs

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(getattr(func, "__self__", None), "__name__", None) or getattr(func, "__name__", None)
        if name not in _METADATA:
            weights: list = []
            if func in _LINEARS:
                bias = args[2] if len(args) > 2 else kwargs.get("bias")
                if bias is None or isinstance(bias, nn.Parameter):
                    weights = [args[1] if len(args) > 1 else kwargs.get("weight")]
            elif func is torch.ops.kiln.merged_linear.default:
                if all(isinstance(b, nn.Parameter) for b in args[2]):
                    weights = list(args[1])
            for value in tree_leaves((args, kwargs)):
                if isinstance(value, nn.Parameter):
                    if self.role is not None:
                        role = self.role
                    elif func is torch.ops.kiln.logits.default and value is args[1]:
                        role = "logits"
                    else:
                        role = "linear" if any(value is w for w in weights) else "other"
                    self.roles.setdefault(id(value), set()).add(role)
        return func(*args, **kwargs)


def _back_to_back(params: list[nn.Parameter]) -> list[list[nn.Parameter]]:
    """The parameters in runs that lie back to back in one storage (siblings the loader laid out for
    merge_linears), each other parameter a run of its own."""
    runs: list[list[nn.Parameter]] = []
    key = lambda p: (str(p.device), p.untyped_storage().data_ptr(), p.storage_offset())  # noqa: E731
    for p in sorted(params, key=key):
        last = runs[-1][-1] if runs else None
        if (last is not None and p.is_contiguous() and last.is_contiguous() and p.device == last.device
                and p.untyped_storage().data_ptr() == last.untyped_storage().data_ptr()
                and p.storage_offset() == last.storage_offset() + last.numel()):
            runs[-1].append(p)
        else:
            runs.append([p])
    return runs


def _to_8bit(run: list[nn.Parameter], kind: str, activations: bool) -> None:
    """Quantize the parameters of one run into one 8-bit storage, in the same order."""
    flat = None if len(run) == 1 else torch.empty(sum(p.numel() for p in run), dtype=QUANT_DTYPES[kind],
                                                   device=run[0].device)
    start = 0
    for p in run:
        data, scale = quantize_weight(p.detach(), kind)
        if flat is not None:
            data = flat[start:start + p.numel()].view(p.shape).copy_(data)
            start += p.numel()
        p.requires_grad_(False)
        p.data = data
        p.kiln_quant = WeightQuant(kind, scale, activations)
