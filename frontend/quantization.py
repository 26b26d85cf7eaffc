"""Pre-quantized checkpoints: what `quantization_config` in config.json says about the weights.

Read here, used by the loader: an 8-bit weight keeps its dtype in the parameter and gets a
`WeightQuant` (kind, per-channel scale, whether activations are quantized) that the quantize pass
turns into a quantized GEMM. Two layouts, as the checkpoints on the supported-models page ship them:

- "fp8" (vLLM's / AutoFP8's): `x.weight` float8_e4m3fn, `x.weight_scale` (one per tensor),
  `x.input_scale` (static activation scale) when `activation_scheme` is "static".
- "compressed-tensors" with 8-bit symmetric weights (float or int, per tensor or per channel),
  activations either unquantized (weight-only) or quantized 8-bit (W8A8).

Activations of W8A8 layers are quantized per token with a dynamic scale in both cases: a static
`input_scale` is read past (per-token scales are at least as accurate, and need no calibration).
Block-wise, grouped, 4-bit and asymmetric schemes are refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.ir.quant_ops import WeightQuant

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
