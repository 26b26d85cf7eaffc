"""Triton kernels as the CUDA implementations of kiln's custom ops.

`register_cuda_kernels()` registers each kernel in `kiln.codegen.kernels` as the "cuda" kernel of
the matching `kiln::` op, so a traced graph's kiln nodes run Triton on CUDA tensors while CPU
tensors keep the reference implementation. Idempotent; a no-op (returning False) when triton
cannot be imported.

`kiln::attention` reads its batch layout from the forward context: `attention` below writes this
step's k/v into the layer's cache at slot_mapping, then runs the decode kernel when every query
length is 1 and the prefill kernel otherwise (or, with no cache, the prefill kernel over this
step's k/v). The per-sequence lengths go to the device as tensors once per step and are shared by
every layer. A runner that captures CUDA graphs must hand them over already on the device, as
`md.query_start_loc` [B+1] int32 and `md.seq_lens_tensor` [B] int32 (vLLM's names), since building
them from the Python lists is a host-to-device copy that a graph cannot hold.

`kiln::linear`, `merged_linear`, `logits` and the ops that fuse a norm or a gated activation
into the linear after it (`rms_norm_linear`, `add_rms_norm_linear`, `act_and_mul_linear`: the
norm or activation kernel, then the linear) stay cuBLAS's (`F.linear`) unless
`set_float_gemv(True)` (the engine's `compilation_config={"float_gemv": ...}`, on by default where
kiln's kernels chain by programmatic dependent launch, see `kernels/pdl.py`): then a one-row
product with float weights (batch-1 decode) streams the weight through the Triton gemv of
`kernels.quant_gemm` instead, which for the fused ops normalizes or gates its input row itself
(one launch). The choice is made per call, so a decode CUDA graph captured at batch 1 holds the gemv and
the larger buckets hold cuBLAS.
"""

from __future__ import annotations

import itertools
import logging
import os
import weakref

import torch

from kiln.ir import ops  # noqa: F401  (the kiln:: ops must exist before kernels are registered on them)
from kiln.ir import quant_ops  # noqa: F401  (likewise the quantized ones)
from kiln.ir.context import AttentionMetadata, get_forward_context

_registered = False
_float_gemv = False
# (metadata, device) of the last step and its device tensors: every layer of a step shares them.
_batch_cache: tuple[weakref.ref, torch.device, tuple] | None = None


def _batch_tensors(md: AttentionMetadata, device: torch.device, paged: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(query_start_loc [B+1] int32, seq_lens [B] int32, max_query_len) on `device`. Without a cache
    the keys are this step's own tokens, so each sequence's length is its query length."""
    global _batch_cache
    hit = _batch_cache
    if hit is not None and hit[0]() is md and hit[1] == device:
        qsl, seq_lens, query_lens, max_query_len = hit[2]
    else:
        max_query_len = max(md.query_lens, default=0)
        qsl, seq_lens = getattr(md, "query_start_loc", None), getattr(md, "seq_lens_tensor", None)
        if not (isinstance(qsl, torch.Tensor) and isinstance(seq_lens, torch.Tensor)):
            qsl = torch.tensor([0, *itertools.accumulate(md.query_lens)], dtype=torch.int32, device=device)
            seq_lens = torch.tensor(md.seq_lens, dtype=torch.int32, device=device)
        query_lens = qsl[1:] - qsl[:-1]
        _batch_cache = (weakref.ref(md), device, (qsl, seq_lens, query_lens, max_query_len))
    return qsl, (seq_lens if paged else query_lens), max_query_len


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, scale: float, sliding_window: int = 0,
    causal: bool = True, soft_cap: float = 0.0, sinks: torch.Tensor | None = None, kv_written: bool = False,
    alibi_slopes: torch.Tensor | None = None,
) -> torch.Tensor:
    """`kiln::attention` on Triton: same arguments and result as the reference (q [T, H, D],
    k [T, Hkv, D], v [T, Hkv, Dv] -> [T, H, Dv])."""
    from kiln.codegen.kernels import decode_attention, prefill_attention, write_kv_cache

    ctx = get_forward_context()
    md = ctx.attn
    if ctx.kv_caches is None:
        qsl, lens, max_q = _batch_tensors(md, q.device, paged=False)
        return prefill_attention(q, k, v, qsl, lens, max_q, scale, None, causal, sliding_window, soft_cap, sinks,
                                 alibi_slopes=alibi_slopes)
    k_cache, v_cache = ctx.kv_caches[layer]
    k_scale, v_scale = ctx.kv_scale(layer)  # (an fp8 cache's; 1.0 and unused otherwise)
    if not kv_written:
        write_kv_cache(k, v, k_cache, v_cache, md.slot_mapping, k_scale, v_scale)
    qsl, seq_lens, max_q = _batch_tensors(md, q.device, paged=True)
    if max_q == 1:  # pure decode; like the reference, one query at the end of its context is causal
        return decode_attention(q, k_cache, v_cache, md.block_tables, seq_lens, scale, sliding_window, soft_cap, sinks,
                                k_scale=k_scale, v_scale=v_scale, alibi_slopes=alibi_slopes)
    return prefill_attention(q, k_cache, v_cache, qsl, seq_lens, max_q, scale, md.block_tables, causal,
                             sliding_window, soft_cap, sinks, k_scale=k_scale, v_scale=v_scale, alibi_slopes=alibi_slopes)


def rotary_kv_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                    cos_sin_cache: torch.Tensor, is_neox: bool, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`kiln::rotary_kv_write` on Triton: one kernel rotates q and k and writes k and v into the cache."""
    from kiln.codegen.kernels import rotary, rotary_kv_cache

    ctx = get_forward_context()
    if ctx.kv_caches is None:
        return rotary(q, k, positions, cos_sin_cache, is_neox)
    k_cache, v_cache = ctx.kv_caches[layer]
    return rotary_kv_cache(q, k, v, positions, cos_sin_cache, is_neox, k_cache, v_cache, ctx.attn.slot_mapping,
                           *ctx.kv_scale(layer))


def set_float_gemv(enabled: bool) -> None:
    """Whether one-row float linears run the Triton gemv (see the module's docstring)."""
    global _float_gemv
    _float_gemv = bool(enabled)


def _gemv_takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (_float_gemv and x.numel() == x.shape[-1] and x.dtype in (torch.bfloat16, torch.float16)
            and weight.dtype == x.dtype and weight.stride(-1) == 1)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           static_weight: bool = True) -> torch.Tensor:
    """static_weight=False: `weight` was made by the forward (not a parameter), see float_linear."""
    if _gemv_takes(x, weight):
        from kiln.codegen.kernels.quant_gemm import float_linear

        return float_linear(x, weight, bias, static_weight=static_weight)
    return torch.nn.functional.linear(x, weight, bias)


def merged_linear(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor]) -> torch.Tensor:
    weight = ops._adjacent(weights)
    # a view of the parameters' one storage, or (weights not laid back to back) a cat made here
    static = weight.untyped_storage().data_ptr() == weights[0].untyped_storage().data_ptr()
    return linear(x, weight, ops._adjacent(biases) if biases else None, static_weight=static)


# the longest row the gemv normalizes itself (its statistics loop is unrolled over the row's K steps)
_NORM_GEMV_MAX_K = 16384


def _fused_gemv_weight(x: torch.Tensor, weights: list[torch.Tensor], w_scale: torch.Tensor | None,
                       k: int) -> tuple[torch.Tensor | None, bool]:
    """(the one matrix, whether it is static) when a fused op's one-row step `x` goes to the gemv
    with a prologue, else (None, False). k: the row width the gemv reads for the weight's K.
    8-bit weights (w_scale given) always do, as `weight_only_linear` runs the gemv at one row; float
    ones where `set_float_gemv` sends one-row linears to it."""
    weight = ops._adjacent(weights)
    one_row = x.numel() == x.shape[-1] == k
    if w_scale is not None:
        takes = one_row and x.dtype in (torch.float32, torch.float16, torch.bfloat16) and weight.stride(-1) == 1
    else:
        takes = one_row and _gemv_takes(x, weight)
    static = weight.untyped_storage().data_ptr() == weights[0].untyped_storage().data_ptr()
    return (weight, static) if takes else (None, False)


def _then_linear(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor],
                 w_scale: torch.Tensor | None) -> torch.Tensor:
    """The unfused path's linear: merged_linear, or the weight-only GEMM of one 8-bit weight."""
    if w_scale is None:
        return merged_linear(x, weights, biases)
    from kiln.codegen.kernels import weight_only_linear

    return weight_only_linear(x, weights[0], w_scale, biases[0] if biases else None)


def _norm_gemv_weight(x, residual, norm_weight, weights, w_scale) -> tuple[torch.Tensor | None, bool]:
    """_fused_gemv_weight for a gemv that normalizes its row: also x, residual and the norm's
    weight in one dtype, and a row short enough for its unrolled statistics loop."""
    same = norm_weight.dtype == x.dtype and (residual is None or residual.dtype == x.dtype)
    if not same or x.shape[-1] > _NORM_GEMV_MAX_K:
        return None, False
    return _fused_gemv_weight(x, weights, w_scale, weights[0].shape[1])


def _gemv_row(x: torch.Tensor, partials: torch.Tensor | None) -> tuple[torch.Tensor, bool]:
    """(the row a norm gemv reads, whether it is partial sums): add_rms_norm_mlp's partials in
    place of its one-row output x when given (`ops.one_row_partials`)."""
    partials = ops.one_row_partials(x, partials)
    return (x, False) if partials is None else (partials, True)


def _gathers_one_row(table: torch.Tensor, index: torch.Tensor) -> bool:
    """Whether a norm gemv may gather its row table[index] itself: one index into a contiguous table."""
    return index.numel() == 1 and table.dim() == 2 and table.is_contiguous()


def _gemv_weight_for(x, residual, norm_weight, weights, w_scale, index) -> tuple[torch.Tensor | None, bool]:
    """_norm_gemv_weight of a norm + linear's row: x, or with index the row x[index] of a table."""
    if index is None:
        return _norm_gemv_weight(x, residual, norm_weight, weights, w_scale)
    if not _gathers_one_row(x, index):
        return None, False
    return _norm_gemv_weight(x[:1], residual, norm_weight, weights, w_scale)


def _row_shape(x: torch.Tensor, index: torch.Tensor | None) -> tuple[int, ...]:
    """The leading shape of a norm + linear's outputs: x's, or the gathered rows' (index's)."""
    return tuple(x.shape[:-1]) if index is None else tuple(index.shape)


def _norm_linear(x, residual, norm_weight, eps, weights, biases, w_scale, partials=None, index=None):
    """(linear(rms_norm(s)), s), s = x + residual or x, or with index (x an embedding table, no
    residual) the rows x[index]: one gemv launch for a one-row step the gemv takes (gathering its
    row itself), else the norm kernel and then the linear (after the embedding's gather)."""
    weight, static = _gemv_weight_for(x, residual, norm_weight, weights, w_scale, index)
    if weight is None and index is not None:  # the gather first
        hidden = torch.nn.functional.embedding(index, x)
        return _norm_linear(hidden, None, norm_weight, eps, weights, biases, w_scale)[0], hidden
    if weight is not None:
        from kiln.codegen.kernels.quant_gemm import rms_norm_gemv

        row, is_partial = _gemv_row(x, partials) if index is None else (x, False)
        out, summed = rms_norm_gemv(row, residual, norm_weight, eps, weight, ops._adjacent(biases) if biases else None,
                                    static_weight=static, w_scale=w_scale, partials=is_partial, index=index)
        shape = _row_shape(x, index)
        return out.view(*shape, -1), summed.view(*shape, -1) if summed is not None else None
    x = ops._one_row_input(x, partials)
    from kiln.codegen.kernels import add_rms_norm, rms_norm

    if residual is None:
        return _then_linear(rms_norm(x, norm_weight, eps), weights, biases, w_scale), None
    normed, summed = add_rms_norm(x, residual, norm_weight, eps)
    return _then_linear(normed, weights, biases, w_scale), summed


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 partials: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The norm kernel, reading a one-row x from add_rms_norm_mlp's partial sums when given (a
    model's final norm after its last MLP)."""
    from kiln.codegen import kernels

    return kernels.add_rms_norm(x, residual, weight, eps, ops.one_row_partials(x, partials))


def rms_norm_linear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weights: list[torch.Tensor],
                    biases: list[torch.Tensor], w_scale: torch.Tensor | None = None) -> torch.Tensor:
    return _norm_linear(x, None, norm_weight, eps, weights, biases, w_scale)[0]


def add_rms_norm_linear(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                        weights: list[torch.Tensor], biases: list[torch.Tensor],
                        w_scale: torch.Tensor | None = None,
                        partials: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return _norm_linear(x, residual, norm_weight, eps, weights, biases, w_scale, partials)


def _norm_linear_rope(x, residual, norm_weight, eps, weights, biases, w_scale, positions, cos_sin_cache, is_neox,
                      layer, num_heads, num_kv_heads, head_dim, partials=None, index=None):
    """(the rotated q/k/v projection, x + residual or None, or with index x[index] as _norm_linear's):
    one gemv launch for a one-row step the gemv takes (the norm in its prologue; rotary and the cache
    write in its epilogue), else the norm + linear and then the rotary kernel, rotating the
    projection's q and k where they are."""
    ctx = get_forward_context()
    weight, static = _gemv_weight_for(x, residual, norm_weight, weights, w_scale, index)
    if weight is not None and ctx.kv_caches is not None and cos_sin_cache.shape[-1] == head_dim and head_dim % 2 == 0:
        from kiln.codegen.kernels.quant_gemm import GPTJ, NEOX, Rope, rope_gemv

        k_cache, v_cache = ctx.kv_caches[layer]
        rope = Rope(NEOX if is_neox else GPTJ, positions, cos_sin_cache, ctx.attn.slot_mapping, k_cache, v_cache,
                    num_heads, num_kv_heads, head_dim, *ctx.kv_scale(layer))
        row, is_partial = _gemv_row(x, partials) if index is None else (x, False)
        out, summed = rope_gemv(row, residual, norm_weight, eps, weight, ops._adjacent(biases) if biases else None,
                                rope, static_weight=static, w_scale=w_scale, partials=is_partial, index=index)
        shape = _row_shape(x, index)
        return out.view(*shape, -1), summed.view(*shape, -1) if summed is not None else None
    from kiln.codegen.kernels.rotary import rotary_in_place

    out, summed = _norm_linear(x, residual, norm_weight, eps, weights, biases, w_scale, partials, index)
    q, k, v = ops.qkv_heads(out, num_heads, num_kv_heads, head_dim)
    if ctx.kv_caches is None:
        rotary_in_place(q, k, positions, cos_sin_cache, is_neox)
    else:
        rotary_in_place(q, k, positions, cos_sin_cache, is_neox, v, *ctx.kv_caches[layer], ctx.attn.slot_mapping,
                        *ctx.kv_scale(layer))
    return out, summed


def rms_norm_linear_rope(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weights: list[torch.Tensor],
                         biases: list[torch.Tensor], w_scale: torch.Tensor | None, positions: torch.Tensor,
                         cos_sin_cache: torch.Tensor, is_neox: bool, layer: int, num_heads: int, num_kv_heads: int,
                         head_dim: int) -> torch.Tensor:
    return _norm_linear_rope(x, None, norm_weight, eps, weights, biases, w_scale, positions, cos_sin_cache, is_neox,
                             layer, num_heads, num_kv_heads, head_dim)[0]


def add_rms_norm_linear_rope(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                             weights: list[torch.Tensor], biases: list[torch.Tensor], w_scale: torch.Tensor | None,
                             positions: torch.Tensor, cos_sin_cache: torch.Tensor, is_neox: bool, layer: int,
                             num_heads: int, num_kv_heads: int, head_dim: int,
                             partials: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return _norm_linear_rope(x, residual, norm_weight, eps, weights, biases, w_scale, positions, cos_sin_cache,
                             is_neox, layer, num_heads, num_kv_heads, head_dim, partials)


def embedding_rms_norm_linear(input_ids: torch.Tensor, embed_weight: torch.Tensor, norm_weight: torch.Tensor,
                              eps: float, weights: list[torch.Tensor], biases: list[torch.Tensor],
                              w_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return _norm_linear(embed_weight, None, norm_weight, eps, weights, biases, w_scale, index=input_ids)


def embedding_rms_norm_linear_rope(input_ids: torch.Tensor, embed_weight: torch.Tensor, norm_weight: torch.Tensor,
                                   eps: float, weights: list[torch.Tensor], biases: list[torch.Tensor],
                                   w_scale: torch.Tensor | None, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                                   is_neox: bool, layer: int, num_heads: int, num_kv_heads: int,
                                   head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _norm_linear_rope(embed_weight, None, norm_weight, eps, weights, biases, w_scale, positions, cos_sin_cache,
                             is_neox, layer, num_heads, num_kv_heads, head_dim, index=input_ids)


def add_rms_norm_mlp(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                     weights: list[torch.Tensor], activation: str, down_t: torch.Tensor, slot: int,
                     slots: int, w_scale: torch.Tensor | None = None, down_scale: torch.Tensor | None = None,
                     down: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One launch for a one-row step that the gemv and `fused_mlp` take (`fused_mlp.mlp_gemv`: out
    is left unwritten, the partial sums carry it); else add_rms_norm_linear, act_and_mul_linear
    (float: cuBLAS reads down's transpose as it is; 8-bit: the weight-only GEMM of down as it was),
    and for one row the partial sums made from out."""
    from kiln.codegen.kernels import fused_mlp

    weight, static = _norm_gemv_weight(x, residual, norm_weight, weights, w_scale)
    H, I = down_t.shape[1], down_t.shape[0]
    if weight is None:
        alike = False
    elif w_scale is not None:  # 8-bit gate/up: down 8-bit as well, with its scales
        alike = down_scale is not None and down_t.dtype == weight.dtype
    else:
        alike = down_scale is None and down_t.dtype == x.dtype
    if (alike and down_t.is_contiguous() and weight.shape == (2 * I, H) and fused_mlp.takes(H, I)
            and activation in fused_mlp.ACTIVATIONS):
        acc, zero = fused_mlp.accumulators(slots, H, x.device).pair(slot)
        summed = fused_mlp.mlp_gemv(x, residual, norm_weight, eps, weight, down_t, acc, zero, activation,
                                    static_weight=static, gate_up_scale=w_scale, down_scale=down_scale)
        return torch.empty_like(x), summed.view_as(x), acc
    from kiln.codegen.kernels.activation import act_and_mul_by_name

    gated, summed = add_rms_norm_linear(x, residual, norm_weight, eps, weights, [], w_scale)
    h = act_and_mul_by_name(gated, activation)
    if down_scale is None:
        out = torch.nn.functional.linear(h, down_t.t())
    else:
        out = _then_linear(h, [down if down is not None else down_t.t()], [], down_scale)
    return out, summed, ops.mlp_partials(out, x)


def act_and_mul_linear(x: torch.Tensor, activation: str, weights: list[torch.Tensor],
                       biases: list[torch.Tensor], w_scale: torch.Tensor | None = None) -> torch.Tensor:
    """One gemv launch for a one-row step the gemv takes, else the activation kernel and then the
    linear."""
    weight, static = _fused_gemv_weight(x, weights, w_scale, 2 * weights[0].shape[1])
    if weight is not None:
        from kiln.codegen.kernels.quant_gemm import act_and_mul_gemv

        return act_and_mul_gemv(x, activation, weight, ops._adjacent(biases) if biases else None,
                                static_weight=static, w_scale=w_scale)
    from kiln.codegen.kernels.activation import act_and_mul_by_name

    return _then_linear(act_and_mul_by_name(x, activation), weights, biases, w_scale)


# Whether a one-row linear_all_reduce at two ranks runs as `quant_gemm.reduced_gemv` (on by default): each
# gemv program sends its values to the peer as it stores them, and a receive-only all-reduce launch sums.
# On two H100s the Llama-3.1-8B TP=2 step took 3.424 and 3.420 ms/token with it against 3.609 and 3.635
# with the gemv, then the all-reduce kernel (session 23, two calls of `benchmarks/scale_out.py`): the
# values cross NVLink while the gemv's last programs run. KILN_FUSED_ALL_REDUCE=0 turns it off.
_fused_env = os.environ.get("KILN_FUSED_ALL_REDUCE", "1")
if _fused_env not in ("0", "1", "send"):  # ("send" was its name beside "last" and "gather", removed in session 36)
    raise ValueError(f"KILN_FUSED_ALL_REDUCE must be 1 or 0, got {_fused_env!r}")
FUSED_ALL_REDUCE = _fused_env != "0"

# Timing only: KILN_TIMING_SKIP_ALL_REDUCE=1 makes every linear_all_reduce this rank's linear alone, with
# no exchange at all, so the sums are wrong. It measures what the all-reduces cost a tensor-parallel decode
# step, as a bound on what any all-reduce work could gain. The 8B TP=2 step without them ran at 1.69x TP=1
# on two H200s and 1.73x on two H100s, against 1.65x with them on both (session 36: `gpu_session.sh
# tp-bound`, i.e. `scale_out.py --compare-env KILN_TIMING_SKIP_ALL_REDUCE=1`). A warning is logged when set.
TIMING_SKIP_ALL_REDUCE = os.environ.get("KILN_TIMING_SKIP_ALL_REDUCE", "0") == "1"
if TIMING_SKIP_ALL_REDUCE:
    logging.getLogger("kiln").warning("KILN_TIMING_SKIP_ALL_REDUCE=1: tensor-parallel linears skip their "
                                      "all-reduce; outputs are wrong (for timing only)")


def linear_all_reduce(x: torch.Tensor, activation: str, weights: list[torch.Tensor], biases: list[torch.Tensor],
                      w_scale: torch.Tensor | None = None) -> torch.Tensor:
    """For a one-row step the gemv takes at two ranks whose all-reduces go through the two-rank
    kernel's "ll" buffers, with FUSED_ALL_REDUCE on: the gemv sending its row to the peer, then the
    receiving launch (`quant_gemm.reduced_gemv`); else the linear (as act_and_mul_linear /
    merged_linear run it), then all_reduce."""
    from kiln.ir import parallel

    small, group = parallel.get_small_all_reduce(), parallel.get_tensor_parallel_group()
    if (FUSED_ALL_REDUCE and not TIMING_SKIP_ALL_REDUCE and group is not None and group.size() == 2
            and hasattr(small, "takes_row")):
        weight, static = _fused_gemv_weight(x, weights, w_scale, weights[0].shape[1] * (2 if activation else 1))
        if weight is not None and small.takes_row(weight.shape[0], x.dtype, x.device):
            from kiln.codegen.kernels.quant_gemm import reduced_gemv

            return reduced_gemv(x, weight, small, activation or None, ops._adjacent(biases) if biases else None,
                                w_scale, static_weight=static)
    partial = (act_and_mul_linear(x, activation, weights, biases, w_scale) if activation
               else _then_linear(x, weights, biases, w_scale))
    return partial if TIMING_SKIP_ALL_REDUCE else ops.all_reduce(partial)


def logits(hidden: torch.Tensor, lm_head: torch.Tensor) -> torch.Tensor:
    """In the model dtype, then float32: the reference's rounding. The gemv stores float32 itself
    (about 4 us a step less than a cast kernel over 128K logits)."""
    if _gemv_takes(hidden, lm_head):
        from kiln.codegen.kernels.quant_gemm import float_linear

        return float_linear(hidden, lm_head, out_dtype=torch.float32)
    return linear(hidden, lm_head).float()


def register_cuda_kernels() -> bool:
    """Make the Triton kernels the CUDA implementations of the kiln ops they implement.
    Returns whether they are registered (False when triton is unavailable)."""
    global _registered
    if _registered:
        return True
    try:
        import triton  # noqa: F401

        from kiln.codegen import kernels
    except ImportError:
        return False
    impls = {
        "kiln::rms_norm": kernels.rms_norm,
        "kiln::add_rms_norm": add_rms_norm,
        "kiln::silu_and_mul": kernels.silu_and_mul,
        "kiln::gelu_and_mul": kernels.gelu_and_mul,
        "kiln::rotary": kernels.rotary,
        "kiln::attention": attention,
        "kiln::rotary_kv_write": rotary_kv_write,
        "kiln::quantize": kernels.quantize,
        "kiln::rms_norm_quant": kernels.rms_norm_quant,
        "kiln::add_rms_norm_quant": kernels.add_rms_norm_quant,
        "kiln::silu_and_mul_quant": kernels.silu_and_mul_quant,
        "kiln::scaled_linear": kernels.scaled_linear,
        "kiln::weight_only_linear": kernels.weight_only_linear,
        "kiln::linear": linear,
        "kiln::merged_linear": merged_linear,
        "kiln::rms_norm_linear": rms_norm_linear,
        "kiln::add_rms_norm_linear": add_rms_norm_linear,
        "kiln::act_and_mul_linear": act_and_mul_linear,
        "kiln::linear_all_reduce": linear_all_reduce,
        "kiln::rms_norm_linear_rope": rms_norm_linear_rope,
        "kiln::add_rms_norm_linear_rope": add_rms_norm_linear_rope,
        "kiln::embedding_rms_norm_linear": embedding_rms_norm_linear,
        "kiln::embedding_rms_norm_linear_rope": embedding_rms_norm_linear_rope,
        "kiln::add_rms_norm_mlp": add_rms_norm_mlp,
        "kiln::logits": logits,
    }
    for name, fn in impls.items():
        torch.library.register_kernel(name, "cuda", fn)
    _registered = True
    return True
