"""Gated activations: silu_and_mul (SwiGLU) and gelu_and_mul (GeGLU, erf or tanh form).

Same semantics as `kiln.ir.ops.silu_and_mul` / `gelu_and_mul`: x [..., 2F] holds (gate, up) ->
act(gate) * up, [..., F], in x's dtype (float32/float16/bfloat16). x needs a unit last stride
(other layouts are copied). The activation is computed in float32 and rounded to x's dtype
before the product, as the reference's two separate ops round it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.codegen.kernels.pdl import launch_args, wait_for_inputs

_ACT_SILU, _ACT_GELU, _ACT_GELU_TANH = 0, 1, 2
# the gated activations by name (as `kiln::act_and_mul_linear` names them) -> `act_and_mul`'s ACT
ACTIVATIONS = {"silu": _ACT_SILU, "gelu": _ACT_GELU, "gelu_tanh": _ACT_GELU_TANH}
_BLOCK = 1024


@triton.jit
def act_and_mul(gate, up, ACT: tl.constexpr):
    """act(gate) * up in gate's dtype: the activation in float32, rounded to the dtype before the
    product (as the reference's two ops round it). ACT: 0 silu, 1 gelu (erf), 2 gelu (tanh)."""
    g = gate.to(tl.float32)
    if ACT == 0:  # silu
        a = g * tl.sigmoid(g)
    elif ACT == 1:  # gelu, erf form
        a = 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))
    else:  # gelu, tanh form: 0.5 * (1 + tanh(u)) == sigmoid(2u)
        u = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        a = g * tl.sigmoid(2.0 * u)
    return (a.to(gate.dtype).to(tl.float32) * up.to(tl.float32)).to(gate.dtype)


@triton.jit
def _act_and_mul_kernel(x_ptr, out_ptr, x_stride, F, ACT: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * x_stride + F + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * F + cols, act_and_mul(gate, up, ACT).to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, act: int) -> torch.Tensor:
    F = x.shape[-1] // 2
    out = x.new_empty((*x.shape[:-1], F))
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    if rows == 0 or F == 0:
        return out
    block = min(_BLOCK, triton.next_power_of_2(F))
    _act_and_mul_kernel[(rows, triton.cdiv(F, block))](x2, out, x2.stride(0), F, ACT=act, BLOCK=block, num_warps=4,
                                                         **launch_args(x.device))
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2F] holding (gate, up) -> silu(gate) * up, [..., F]."""
    return _launch(x, _ACT_SILU)


def act_and_mul_by_name(x: torch.Tensor, activation: str) -> torch.Tensor:
    """x [..., 2F] holding (gate, up) -> act(gate) * up, act one of ACTIVATIONS."""
    return _launch(x, ACTIVATIONS[activation])


def gelu_and_mul(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """x [..., 2F] holding (input, gate) -> gelu(input) * gate, [..., F]; approximate "none" or "tanh"."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu_and_mul: approximate must be 'none' or 'tanh', got {approximate!r}")
    return _launch(x, _ACT_GELU if approximate == "none" else _ACT_GELU_TANH)
