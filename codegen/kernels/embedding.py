"""`kiln::embedding` on CUDA: a table's rows by token id, as a kiln kernel that follows the PDL
protocol (`pdl.py`).

torch's gather (`index_select`, which `F.embedding` runs) is launched without PDL. In a decode
graph it stands between the input kernel and the first q/k/v gemv, and the gemv, launched only
when it has finished, cannot load its first weight tiles beside it: 3.5 us of a 1B step on an
H100 (the profile in codegen/NOTES.md, session 27). Here the gemv may launch as soon as this
kernel's programs have passed their wait. `TRITON_EMBEDDING` (KILN_TRITON_EMBEDDING=1) puts it in
the op's place; off until a GPU times it (`decode_latency.py --compare-switches triton_embedding=1`).

Token ids are not checked here: the engine rejects a prompt id outside the vocabulary before it
reaches a kernel (`Engine` validation), and sampled ids come from the logits' own width.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kiln.codegen.kernels.pdl import launch_args, wait_for_inputs

TRITON_EMBEDDING = os.environ.get("KILN_TRITON_EMBEDDING", "0") == "1"

_BLOCK = 1024  # row elements a program copies (2 KB in bf16)


@triton.jit
def _embedding_kernel(ids_ptr, weight_ptr, out_ptr, E, stride_w, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < E
    token = tl.load(ids_ptr + row).to(tl.int64)
    tl.store(out_ptr + row * E + cols, tl.load(weight_ptr + token * stride_w + cols, mask=mask), mask=mask)


def embedding(input_ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """input_ids [...] (int32 or int64), weight [V, E] with unit last stride -> [..., E] in weight's
    dtype: `F.embedding(input_ids, weight)`."""
    if input_ids.dtype not in (torch.int32, torch.int64) or weight.dim() != 2 or weight.stride(1) != 1:
        raise ValueError(f"embedding: integer ids and a [V, E] table with unit last stride, got {input_ids.dtype} ids "
                         f"and a table of shape {tuple(weight.shape)}, strides {weight.stride()}")
    E = weight.shape[1]
    ids = input_ids.reshape(-1)
    out = weight.new_empty((ids.numel(), E))
    if ids.numel():
        _embedding_kernel[(ids.numel(), triton.cdiv(E, _BLOCK))](
            ids.contiguous(), weight, out, E, weight.stride(0), BLOCK=_BLOCK, num_warps=4, **launch_args(weight.device))
    return out.view(*input_ids.shape, E)
