"""The op vocabulary: every kiln model is written with these ops and plain tensor code.

Each op is a `torch.library.custom_op` in the `kiln` namespace with a reference implementation in
plain torch (the ground truth on every device, and what runs on CPU and with enforce_eager) and a
fake implementation for tracing. Token tensors are flattened over the batch: `T` is the number of
tokens scheduled in the step, `H`/`Hkv` the query/key-value heads, `D` the head dim.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from kiln.ir.context import get_forward_context


def kiln_op(name: str):
    """Register the function as the custom op `kiln::name` and return a callable that runs it.

    While torch.compile traces, the call goes through the custom op, so the graph holds one opaque
    `kiln.name` node for passes and codegen to rewrite. In eager mode it calls the reference
    implementation directly: the same code, minus the dispatcher's per-call cost (about 0.1 ms on
    a GPU host, which dominated small eager steps). `.op` is the custom op itself.
    """

    def wrap(fn):
        op = torch.library.custom_op(f"kiln::{name}", mutates_args=())(fn)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            if torch.compiler.is_compiling():
                return op(*args, **kwargs)
            return fn(*args, **kwargs)

        call.op = op
        call.register_fake = op.register_fake
        return call

    return wrap

# ---------------------------------------------------------------- embedding, linear, logits


@kiln_op("embedding")
def embedding(input_ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """input_ids [T] int64, weight [V, E] -> [T, E] in weight's dtype."""
    return F.embedding(input_ids, weight)


@embedding.register_fake
def _(input_ids, weight):
    return weight.new_empty((*input_ids.shape, weight.shape[1]))


@kiln_op("linear")
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K], weight [N, K], bias [N] or None -> [..., N]."""
    return F.linear(x, weight, bias)


@linear.register_fake
def _(x, weight, bias=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@kiln_op("merged_linear")
def merged_linear(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor]) -> torch.Tensor:
    """Sibling linears on one input as one matmul: x [..., K], weights [N_i, K], biases [N_i] (or [])
    -> [..., sum N_i], the outputs side by side. Produced by the merge_linears pass, which lays the
    weights out back to back in one storage, so they are read as one matrix without a copy."""
    return F.linear(x, _adjacent(weights), _adjacent(biases) if biases else None)


def _adjacent(tensors: list[torch.Tensor]) -> torch.Tensor:
    """cat(tensors, 0) — as a view when they already lie back to back in one storage."""
    first = tensors[0]
    end = first.storage_offset()
    for t in tensors:
        if (t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() or t.storage_offset() != end
                or not t.is_contiguous() or t.shape[1:] != first.shape[1:]):
            return torch.cat(tensors, 0)
        end += t.numel()
    rows = sum(t.shape[0] for t in tensors)
    return first.as_strided((rows, *first.shape[1:]), first.stride(), first.storage_offset())


@merged_linear.register_fake
def _(x, weights, biases):
    return x.new_empty((*x.shape[:-1], sum(w.shape[0] for w in weights)))


@kiln_op("logits")
def logits(hidden: torch.Tensor, lm_head: torch.Tensor) -> torch.Tensor:
    """hidden [N, E], lm_head [V, E] -> float32 logits [N, V] (matmul in the model dtype, as HF)."""
    return F.linear(hidden, lm_head).float()


@logits.register_fake
def _(hidden, lm_head):
    return hidden.new_empty((hidden.shape[0], lm_head.shape[0]), dtype=torch.float32)


# ---------------------------------------------------------------- norms and activations


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Statistics in float32, scale in the input dtype: the order HF's LlamaRMSNorm uses.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


@kiln_op("rms_norm")
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., E], weight [E] -> [..., E]."""
    return _rms_norm(x, weight, eps)


@rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x)


@kiln_op("add_rms_norm")
def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
    partials: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add then RMSNorm: returns (rms_norm(x + residual), x + residual), both [..., E].
    partials: as add_rms_norm_linear's (a model's final norm after a fused MLP)."""
    summed = _one_row_input(x, partials) + residual
    return _rms_norm(summed, weight, eps), summed


@add_rms_norm.register_fake
def _(x, residual, weight, eps, partials=None):
    return torch.empty_like(x), torch.empty_like(x)


def _fused_linear(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor],
                  w_scale: torch.Tensor | None) -> torch.Tensor:
    """The linear a fused op ends with: merged_linear of float weights, or (w_scale given) the
    weight-only GEMM of one 8-bit weight (`quant_ops.weight_only_linear`)."""
    if w_scale is None:
        return merged_linear(x, weights, biases)
    from kiln.ir.quant_ops import weight_only_linear

    return weight_only_linear(x, weights[0], w_scale, biases[0] if biases else None)


@kiln_op("rms_norm_linear")
def rms_norm_linear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weights: list[torch.Tensor],
                    biases: list[torch.Tensor], w_scale: torch.Tensor | None = None) -> torch.Tensor:
    """merged_linear(rms_norm(x, norm_weight, eps), weights, biases): an RMSNorm whose output only
    a linear reads, as one op (the fuse_norm_linear pass). With w_scale, the linear is the
    weight-only GEMM of weights[0] (8-bit) instead. On a GPU a one-row step runs it as one gemv
    that normalizes its input row itself, so the normalized row never goes to memory."""
    return _fused_linear(_rms_norm(x, norm_weight, eps), weights, biases, w_scale)


@rms_norm_linear.register_fake
def _(x, norm_weight, eps, weights, biases, w_scale=None):
    return x.new_empty((*x.shape[:-1], sum(w.shape[0] for w in weights)))


def one_row_partials(x: torch.Tensor, partials: torch.Tensor | None) -> torch.Tensor | None:
    """The partial sums (add_rms_norm_mlp's) that stand for x, given with it: for one row only, the
    form in which that op hands a one-row output on."""
    return partials if partials is not None and x.numel() == x.shape[-1] else None


def _one_row_input(x: torch.Tensor, partials: torch.Tensor | None) -> torch.Tensor:
    """x, or the partial sums that stand for it (`one_row_partials`) summed and rounded to x's dtype."""
    partials = one_row_partials(x, partials)
    return x if partials is None else partials.sum(0).to(x.dtype).view_as(x)


@kiln_op("add_rms_norm_linear")
def add_rms_norm_linear(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                        weights: list[torch.Tensor], biases: list[torch.Tensor],
                        w_scale: torch.Tensor | None = None,
                        partials: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """add_rms_norm whose normalized output only a linear reads, with that linear (as in
    rms_norm_linear): returns (linear(rms_norm(x + residual)), x + residual). partials: x is an
    add_rms_norm_mlp's output, and for one row the op reads that op's partial sums in its place."""
    summed = _one_row_input(x, partials) + residual
    return _fused_linear(_rms_norm(summed, norm_weight, eps), weights, biases, w_scale), summed


@add_rms_norm_linear.register_fake
def _(x, residual, norm_weight, eps, weights, biases, w_scale=None, partials=None):
    return x.new_empty((*x.shape[:-1], sum(w.shape[0] for w in weights))), torch.empty_like(x)


@kiln_op("layer_norm")
def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x [..., E], weight [E], bias [E] or None -> [..., E] (statistics over the last dim)."""
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


@layer_norm.register_fake
def _(x, weight, bias, eps):
    return torch.empty_like(x)


_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}
# HF `hidden_act` names -> kiln activation kinds
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                  "relu": "relu", "silu": "silu", "swish": "silu", "tanh": "tanh"}


@kiln_op("activation")
def activation(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Elementwise activation; kind one of gelu (erf), gelu_tanh, relu, silu, tanh, sigmoid."""
    return _ACTIVATIONS[kind](x)


@activation.register_fake
def _(x, kind):
    return torch.empty_like(x)


@kiln_op("gelu_and_mul")
def gelu_and_mul(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """x [..., 2F] holding (input, gate) -> gelu(input) * gate, [..., F] (GeGLU)."""
    a, gate = x.chunk(2, dim=-1)
    return F.gelu(a, approximate=approximate) * gate


@gelu_and_mul.register_fake
def _(x, approximate="none"):
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


@kiln_op("silu_and_mul")
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2F] holding (gate, up) -> silu(gate) * up, [..., F]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


@silu_and_mul.register_fake
def _(x):
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


_GATED = {"silu": lambda x: silu_and_mul(x), "gelu": lambda x: gelu_and_mul(x, "none"),
          "gelu_tanh": lambda x: gelu_and_mul(x, "tanh")}


@kiln_op("act_and_mul_linear")
def act_and_mul_linear(x: torch.Tensor, activation: str, weights: list[torch.Tensor],
                       biases: list[torch.Tensor], w_scale: torch.Tensor | None = None) -> torch.Tensor:
    """merged_linear(silu_and_mul(x)) (activation "silu"), or of gelu_and_mul(x) ("gelu", "gelu_tanh"):
    a gated activation whose output only a linear reads, as one op (the fuse_activation_linear
    pass); with w_scale, the weight-only GEMM of weights[0] (8-bit). On a GPU a one-row step runs
    it as one gemv that gates its input row itself."""
    if activation not in _GATED:
        raise ValueError(f"act_and_mul_linear: activation must be one of {sorted(_GATED)}, got {activation!r}")
    return _fused_linear(_GATED[activation](x), weights, biases, w_scale)


@act_and_mul_linear.register_fake
def _(x, activation, weights, biases, w_scale=None):
    return x.new_empty((*x.shape[:-1], sum(w.shape[0] for w in weights)))


# The float32 rows of partial sums in which add_rms_norm_mlp hands on a one-row output
# (codegen/kernels/fused_mlp.py: why two)
MLP_PARTIALS = 2


@kiln_op("add_rms_norm_mlp")
def add_rms_norm_mlp(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                     weights: list[torch.Tensor], activation: str, down_t: torch.Tensor, slot: int,
                     slots: int, w_scale: torch.Tensor | None = None, down_scale: torch.Tensor | None = None,
                     down: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A gated MLP with the add + RMSNorm before it, as one op (the fuse_mlp pass):
    add_rms_norm_linear(x, residual, ..., weights) (gate/up, no bias), then
    act_and_mul_linear(..., activation, [down_t.t()]) (down, given transposed: [I, H]). Returns
    (out, x + residual, partials): partials are MLP_PARTIALS float32 rows [MLP_PARTIALS, H]; for
    one row, their sum is out before its rounding, and the reader (an add_rms_norm_linear[_rope]
    given them) reads them in out's place. On a GPU one row is one launch that adds into partial
    sums (`fused_mlp.py`), where out is never written; `slot` of `slots` names this MLP's buffer of
    them among the forward's fused MLPs. 8-bit weight-only (w_scale, down_scale: weights[0] and
    down_t 8-bit, as the fused ops' w_scale): down is also given as it was, [H, I], for the GEMM
    of several rows."""
    if activation not in _GATED:
        raise ValueError(f"add_rms_norm_mlp: activation must be one of {sorted(_GATED)}, got {activation!r}")
    gated, summed = add_rms_norm_linear(x, residual, norm_weight, eps, weights, [], w_scale)
    if down_scale is None:
        out = F.linear(_GATED[activation](gated), down_t.t())
    else:
        out = _fused_linear(_GATED[activation](gated), [down if down is not None else down_t.t()], [], down_scale)
    return out, summed, mlp_partials(out, x)


def mlp_partials(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """add_rms_norm_mlp's partial sums when made from its output: for one row, out and zeros;
    otherwise unread (left uninitialized)."""
    if x.numel() != x.shape[-1]:
        return torch.empty((MLP_PARTIALS, out.shape[-1]), dtype=torch.float32, device=x.device)
    partials = torch.zeros((MLP_PARTIALS, out.shape[-1]), dtype=torch.float32, device=x.device)
    partials[0] = out.reshape(-1).float()
    return partials


@add_rms_norm_mlp.register_fake
def _(x, residual, norm_weight, eps, weights, activation, down_t, slot, slots, w_scale=None, down_scale=None,
      down=None):
    return (x.new_empty((*x.shape[:-1], down_t.shape[1])), torch.empty_like(x),
            x.new_empty((MLP_PARTIALS, down_t.shape[1]), dtype=torch.float32))


# ---------------------------------------------------------------- rotary position embedding


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool) -> torch.Tensor:
    rot_dim = cos.shape[-1] * 2
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    if is_neox:  # halves: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)
        x1, x2 = x_rot.chunk(2, dim=-1)
    else:  # gpt-j: interleaved pairs
        x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
    o1, o2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    out = torch.cat((o1, o2), dim=-1) if is_neox else torch.stack((o1, o2), dim=-1).flatten(-2)
    return torch.cat((out, x_pass), dim=-1)


@kiln_op("rotary")
def rotary(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, is_neox: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q [T, H, D] and k [T, Hkv, D] at positions [T].

    cos_sin_cache [max_positions, rotary_dim] float32 holds (cos | sin) of each position, each
    rotary_dim/2 wide, with the rope-scaling variant and its attention factor already applied.
    Only the first rotary_dim dims of each head rotate (partial rotary).
    """
    cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)  # [T, rotary_dim/2]
    cos, sin = cos[:, None, :].to(q.dtype), sin[:, None, :].to(q.dtype)
    return _rotate(q, cos, sin, is_neox), _rotate(k, cos, sin, is_neox)


@rotary.register_fake
def _(q, k, positions, cos_sin_cache, is_neox):
    return torch.empty_like(q), torch.empty_like(k)


# ---------------------------------------------------------------- attention


# An fp8 KV cache (kv_cache_dtype="fp8") holds x / scale in float8_e4m3fn, saturated at its
# largest finite value; every other cache holds x in its own dtype, with no scale.
FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0


def quantize_kv(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x [..] -> float8_e4m3fn (x / scale), computed in float32 and clamped to +-448."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_KV_DTYPE)


def dequantize_kv(cache: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """An fp8 cache's values [..] -> cache * scale in `dtype` (computed in float32)."""
    return (cache.float() * scale).to(dtype)


def _seq_kv(kv: torch.Tensor, cache: torch.Tensor | None, block_row: torch.Tensor, start: int, end: int, seq_len: int,
            scale: float = 1.0):
    """Keys (or values) of one sequence, [seq_len, Hkv, D]: from the paged cache when there is one
    (dequantized to kv's dtype when it is fp8)."""
    if cache is None:
        return kv[start:end]
    block_size = cache.shape[1]
    num_blocks = -(-seq_len // block_size)
    out = cache[block_row[:num_blocks]].flatten(0, 1)[:seq_len]
    return dequantize_kv(out, scale, kv.dtype) if cache.dtype == FP8_KV_DTYPE else out


def _mask(q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool, sliding_window: int) -> torch.Tensor:
    """Boolean [.., Q, K] mask: True where query at q_pos may attend key at k_pos."""
    diff = q_pos[..., :, None] - k_pos[..., None, :]
    if not causal:  # bidirectional window, centred on the query (ModernBERT's local attention)
        if sliding_window > 0:
            return diff.abs() <= sliding_window // 2
        return torch.ones_like(diff, dtype=torch.bool)
    allowed = diff >= 0
    if sliding_window > 0:  # HF semantics: a window of W keeps keys with q_pos - k_pos < W
        allowed = allowed & (diff < sliding_window)
    return allowed


@kiln_op("attention")
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer: int,
    scale: float,
    sliding_window: int = 0,
    causal: bool = True,
    soft_cap: float = 0.0,
    sinks: torch.Tensor | None = None,
    kv_written: bool = False,
    alibi_slopes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of this step's queries over each sequence's context.

    q [T, H, D], k [T, Hkv, D], v [T, Hkv, Dv] (H a multiple of Hkv: grouped-query attention; Dv
    may differ from D, as in multi-head latent attention) -> [T, H, Dv].
    Reads the batch layout from the forward context; when it holds a KV cache, first writes this
    step's k/v into `kv_caches[layer]` at `slot_mapping` (the only op that touches the cache),
    then attends over the cached context. `sliding_window` 0 means full attention; a window W
    keeps, for causal attention, the keys with 0 <= q_pos - k_pos < W (HF's `sliding_window`) and,
    for bidirectional attention (causal=False), those with |q_pos - k_pos| <= W // 2: W is the
    whole window around the query, as ModernBERT's `local_attention`. `soft_cap` > 0 caps the
    scores as cap * tanh(score / cap) before the softmax (Gemma 2). `sinks` [H] float32, when
    given, are attention sinks: one learned logit per head that joins each query's softmax as an
    extra key with no value, so the weights over the real keys sum to less than one (GPT-OSS).
    `alibi_slopes` [H] float32, when given, add slope * (k_pos - q_pos) to each head's scores
    (ALiBi: BLOOM).
    """
    ctx = get_forward_context()
    md = ctx.attn
    k_cache = v_cache = None
    k_scale = v_scale = 1.0
    if ctx.kv_caches is not None:
        k_cache, v_cache = ctx.kv_caches[layer]
        k_scale, v_scale = ctx.kv_scale(layer)
        if not kv_written:  # (rotary_kv_write, produced by a pass, has written them already)
            _write_kv(k, v, k_cache, v_cache, md.slot_mapping, k_scale, v_scale)

    if k_cache is None and md.num_seqs > 1:
        return _padded_attention(q, k, v, md, scale, sliding_window, causal, soft_cap, sinks, alibi_slopes)
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    decode_rows, decode_seqs = [], []
    start = 0
    for i, (q_len, seq_len) in enumerate(zip(md.query_lens, md.seq_lens)):
        end = start + q_len
        if q_len == 1 and k_cache is not None:
            decode_rows.append(start)
            decode_seqs.append(i)
        else:
            ks = _seq_kv(k, k_cache, md.block_tables[i], start, end, seq_len, k_scale)
            vs = _seq_kv(v, v_cache, md.block_tables[i], start, end, seq_len, v_scale)
            q_pos, k_pos = torch.arange(seq_len - q_len, seq_len, device=q.device), torch.arange(seq_len, device=q.device)
            mask = _mask(q_pos, k_pos, causal, sliding_window)
            bias = _alibi(alibi_slopes, q_pos, k_pos)
            out[start:end] = _sdpa(q[start:end].unsqueeze(0), ks.unsqueeze(0), vs.unsqueeze(0), mask[None], scale,
                                   soft_cap, sinks, None if bias is None else bias[None])[0]
        start = end
    if decode_seqs:
        out[decode_rows] = _decode_attention(q[decode_rows], k_cache, v_cache, md, decode_seqs, scale, sliding_window,
                                             soft_cap, sinks, k_scale, v_scale, alibi_slopes)
    return out


def _alibi(slopes: torch.Tensor | None, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor | None:
    """ALiBi's score bias [.., H, Q, K] = slope[h] * (k_pos - q_pos), q_pos [.., Q], k_pos [.., K]."""
    if slopes is None:
        return None
    distance = (k_pos[..., None, :] - q_pos[..., :, None]).float()
    return slopes.float()[:, None, None] * distance.unsqueeze(-3)


def _sdpa(q, k, v, mask, scale, soft_cap=0.0, sinks=None, bias=None):
    """q [B, Q, H, D], k [B, K, Hkv, D], v [B, K, Hkv, Dv], mask [B or 1, Q, K] bool or None (attend
    to all), sinks [H] or None, bias [B or 1, H, Q, K] float added to the scores or None -> [B, Q, H, Dv]."""
    if soft_cap > 0 or sinks is not None or bias is not None:  # beyond SDPA: spell the attention out
        group = q.shape[2] // k.shape[2]
        k, v = k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
        if soft_cap > 0:
            scores = soft_cap * torch.tanh(scores / soft_cap)
        if bias is not None:
            scores = scores + bias
        if mask is not None:
            scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
        if sinks is None:
            weights = scores.softmax(-1)
        else:  # the sink is one more logit in each row's softmax; its weight is dropped
            sink = sinks.float()[None, :, None, None].expand(*scores.shape[:-1], 1)
            weights = torch.cat((scores, sink), -1).softmax(-1)[..., :-1]
        return torch.einsum("bhqk,bkhd->bqhd", weights, v.float()).to(q.dtype)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask.unsqueeze(1) if mask is not None else None,
        scale=scale, enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)


def _padded_attention(q, k, v, md, scale, sliding_window, causal, soft_cap, sinks, alibi_slopes=None):
    """Whole sequences and no cache (a pooling step): pad each to the longest and attend in one
    batched call, instead of one call per sequence."""
    rows, valid = md.padded_layout(q.device)  # [B, L] token row of each padded position, and which are real
    pos = torch.arange(rows.shape[1], device=q.device)
    mask = _mask(pos, pos, causal, sliding_window)[None] & valid[:, None, :]
    bias = _alibi(alibi_slopes, pos, pos)
    return _sdpa(q[rows], k[rows], v[rows], mask, scale, soft_cap, sinks, None if bias is None else bias[None])[valid]


def _decode_attention(q, k_cache, v_cache, md, seqs, scale, sliding_window, soft_cap, sinks, k_scale=1.0, v_scale=1.0,
                      alibi_slopes=None):
    """One query per sequence, batched: gather each sequence's blocks, mask the padding. An fp8
    cache is dequantized to q's dtype."""
    seq_lens = torch.tensor([md.seq_lens[i] for i in seqs], device=q.device)
    max_blocks = -(-int(seq_lens.max()) // k_cache.shape[1])
    tables = md.block_tables[seqs, :max_blocks]
    ks, vs = k_cache[tables].flatten(1, 2), v_cache[tables].flatten(1, 2)  # [B, max_blocks*bs, Hkv, D or Dv]
    if k_cache.dtype == FP8_KV_DTYPE:
        ks, vs = dequantize_kv(ks, k_scale, q.dtype), dequantize_kv(vs, v_scale, q.dtype)
    k_pos = torch.arange(ks.shape[1], device=q.device)
    mask = _mask((seq_lens - 1)[:, None], k_pos[None, :], True, sliding_window) & (k_pos[None, :] < seq_lens[:, None])[:, None, :]
    bias = _alibi(alibi_slopes, (seq_lens - 1)[:, None], k_pos[None, :].expand(len(seqs), -1))  # [B, H, 1, K]
    return _sdpa(q.unsqueeze(1), ks, vs, mask, scale, soft_cap, sinks, bias)[:, 0]


@kiln_op("cross_attention")
def cross_attention(q: torch.Tensor, layer: int, scale: float) -> torch.Tensor:
    """Encoder-decoder attention: q [T, H, D] of this step's decoder tokens over each sequence's
    encoder output, whose keys and values were projected once and stored in the forward
    context's `cross_kv_caches[layer]` at the sequence's `cross_slots` entry -> [T, H, D].
    Every decoder token sees the whole encoder output (no mask)."""
    ctx = get_forward_context()
    md = ctx.attn
    k_cache, v_cache = ctx.cross_kv_caches[layer]
    if all(n == 1 for n in md.query_lens):  # decode: one query per sequence, batched
        slots = getattr(md, "cross_slots_tensor", None)  # (a CUDA graph's static buffer, when replaying)
        if slots is None:
            slots = torch.tensor(md.cross_slots, device=q.device)
        return _sdpa(q.unsqueeze(1), k_cache[slots], v_cache[slots], None, scale)[:, 0]
    out, start = torch.empty_like(q), 0
    for n, slot in zip(md.query_lens, md.cross_slots):
        out[start:start + n] = _sdpa(q[start:start + n][None], k_cache[slot][None], v_cache[slot][None], None, scale)[0]
        start += n
    return out


@kiln_op("rotary_kv_write")
def rotary_kv_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                    cos_sin_cache: torch.Tensor, is_neox: bool, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`rotary` fused with the KV-cache write `attention` would do: rotates q and k, writes the
    rotated k and v into the forward context's `kv_caches[layer]` at `slot_mapping` (when there is
    a cache) and returns (rotated q, rotated k). Produced by the fuse_rotary_cache_write pass,
    which then calls `attention(..., kv_written=True)`."""
    q_rot, k_rot = rotary(q, k, positions, cos_sin_cache, is_neox)
    ctx = get_forward_context()
    if ctx.kv_caches is not None:
        k_cache, v_cache = ctx.kv_caches[layer]
        _write_kv(k_rot, v, k_cache, v_cache, ctx.attn.slot_mapping, *ctx.kv_scale(layer))
    return q_rot, k_rot


@rotary_kv_write.register_fake
def _(q, k, v, positions, cos_sin_cache, is_neox, layer):
    return torch.empty_like(q), torch.empty_like(k)


def qkv_heads(qkv: torch.Tensor, num_heads: int, num_kv_heads: int,
              head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [T, (H + Hkv) * D + Hkv * Dv], a merged q/k/v projection's output -> its q [T, H, D],
    k [T, Hkv, D] and v [T, Hkv, Dv] heads, views of it."""
    q_cols, k_cols = num_heads * head_dim, num_kv_heads * head_dim
    q, k, v = qkv.split([q_cols, k_cols, qkv.shape[-1] - q_cols - k_cols], dim=-1)
    return (q.unflatten(-1, (num_heads, head_dim)), k.unflatten(-1, (num_kv_heads, head_dim)),
            v.unflatten(-1, (num_kv_heads, -1)))


def _rope_qkv(qkv: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, is_neox: bool, layer: int,
              num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """qkv, a merged q/k/v projection's output (`qkv_heads`) -> the same layout with the q and k
    heads rotated (`rotary_kv_write`: k and v written into the cache)."""
    q, k, v = qkv_heads(qkv, num_heads, num_kv_heads, head_dim)
    q, k = rotary_kv_write(q, k, v, positions, cos_sin_cache, is_neox, layer)
    return torch.cat([q.flatten(-2), k.flatten(-2), v.flatten(-2)], dim=-1)


@kiln_op("rms_norm_linear_rope")
def rms_norm_linear_rope(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weights: list[torch.Tensor],
                         biases: list[torch.Tensor], w_scale: torch.Tensor | None, positions: torch.Tensor,
                         cos_sin_cache: torch.Tensor, is_neox: bool, layer: int, num_heads: int, num_kv_heads: int,
                         head_dim: int) -> torch.Tensor:
    """rms_norm_linear whose output is a merged q/k/v projection, with the `rotary_kv_write` that
    follows it: the output's q and k heads come out rotated, and k and v go into the cache (the
    fuse_linear_rope pass). On a GPU a one-row step is one gemv that normalizes its row, rotates
    its q/k outputs in its epilogue and stores k and v to the cache."""
    out = rms_norm_linear(x, norm_weight, eps, weights, biases, w_scale)
    return _rope_qkv(out, positions, cos_sin_cache, is_neox, layer, num_heads, num_kv_heads, head_dim)


@rms_norm_linear_rope.register_fake
def _(x, norm_weight, eps, weights, biases, w_scale, positions, cos_sin_cache, is_neox, layer, num_heads,
      num_kv_heads, head_dim):
    return x.new_empty((*x.shape[:-1], sum(w.shape[0] for w in weights)))


@kiln_op("embedding_rms_norm_linear")
def embedding_rms_norm_linear(input_ids: torch.Tensor, embed_weight: torch.Tensor, norm_weight: torch.Tensor,
                              eps: float, weights: list[torch.Tensor], biases: list[torch.Tensor],
                              w_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A model's first norm + linear with the embedding that feeds it (the fuse_embedding pass):
    returns (rms_norm_linear(embedding(input_ids)), embedding(input_ids)). On a GPU a one-token step is
    one gemv that gathers its own row from the table, and the embedding is no launch of its own."""
    hidden = embedding(input_ids, embed_weight)
    return rms_norm_linear(hidden, norm_weight, eps, weights, biases, w_scale), hidden


@embedding_rms_norm_linear.register_fake
def _(input_ids, embed_weight, norm_weight, eps, weights, biases, w_scale=None):
    return (embed_weight.new_empty((*input_ids.shape, sum(w.shape[0] for w in weights))),
            embed_weight.new_empty((*input_ids.shape, embed_weight.shape[1])))


@kiln_op("embedding_rms_norm_linear_rope")
def embedding_rms_norm_linear_rope(input_ids: torch.Tensor, embed_weight: torch.Tensor, norm_weight: torch.Tensor,
                                   eps: float, weights: list[torch.Tensor], biases: list[torch.Tensor],
                                   w_scale: torch.Tensor | None, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                                   is_neox: bool, layer: int, num_heads: int, num_kv_heads: int,
                                   head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """embedding_rms_norm_linear whose linear is the first layer's q/k/v, with the rotary and cache
    write of rms_norm_linear_rope: (the rotated q/k/v projection, embedding(input_ids))."""
    hidden = embedding(input_ids, embed_weight)
    return rms_norm_linear_rope(hidden, norm_weight, eps, weights, biases, w_scale, positions, cos_sin_cache, is_neox,
                                layer, num_heads, num_kv_heads, head_dim), hidden


@embedding_rms_norm_linear_rope.register_fake
def _(input_ids, embed_weight, norm_weight, eps, weights, biases, w_scale, positions, cos_sin_cache, is_neox, layer,
      num_heads, num_kv_heads, head_dim):
    return (embed_weight.new_empty((*input_ids.shape, sum(w.shape[0] for w in weights))),
            embed_weight.new_empty((*input_ids.shape, embed_weight.shape[1])))


@kiln_op("add_rms_norm_linear_rope")
def add_rms_norm_linear_rope(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                             weights: list[torch.Tensor], biases: list[torch.Tensor], w_scale: torch.Tensor | None,
                             positions: torch.Tensor, cos_sin_cache: torch.Tensor, is_neox: bool, layer: int,
                             num_heads: int, num_kv_heads: int, head_dim: int,
                             partials: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """add_rms_norm_linear with the rotary and cache write of rms_norm_linear_rope: returns
    (the rotated q/k/v projection, x + residual). partials: as add_rms_norm_linear's."""
    out, summed = add_rms_norm_linear(x, residual, norm_weight, eps, weights, biases, w_scale, partials)
    return _rope_qkv(out, positions, cos_sin_cache, is_neox, layer, num_heads, num_kv_heads, head_dim), summed


@add_rms_norm_linear_rope.register_fake
def _(x, residual, norm_weight, eps, weights, biases, w_scale, positions, cos_sin_cache, is_neox, layer, num_heads,
      num_kv_heads, head_dim, partials=None):
    return x.new_empty((*x.shape[:-1], sum(w.shape[0] for w in weights))), torch.empty_like(x)


def _write_kv(k, v, k_cache, v_cache, slot_mapping, k_scale=1.0, v_scale=1.0) -> None:
    if k_cache.dtype == FP8_KV_DTYPE:  # quantized; copied as bytes (index_copy_ has no fp8 kernel on CPU)
        k_cache.view(torch.uint8).flatten(0, 1).index_copy_(0, slot_mapping, quantize_kv(k, k_scale).view(torch.uint8))
        v_cache.view(torch.uint8).flatten(0, 1).index_copy_(0, slot_mapping, quantize_kv(v, v_scale).view(torch.uint8))
        return
    k_cache.flatten(0, 1).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.flatten(0, 1).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


@cross_attention.register_fake
def _(q, layer, scale):
    return torch.empty_like(q)


@attention.register_fake
def _(q, k, v, layer, scale, sliding_window=0, causal=True, soft_cap=0.0, sinks=None, kv_written=False,
      alibi_slopes=None):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


# ---------------------------------------------------------------- tensor parallelism
# The collectives of a tensor-parallel model (frontend/sharding.py swaps in the modules that call
# them). They run over the group the runtime sets around a step (ir/parallel.py); with none, one
# rank holds everything and they are identities.

import torch.distributed as dist  # noqa: E402  (this section's own imports)

from kiln.ir import parallel as _parallel  # noqa: E402


@kiln_op("all_reduce")
def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """x [...] -> the sum of x over the tensor-parallel ranks, same shape and dtype (a row-parallel
    linear's partial products, a vocab-parallel embedding's masked lookups)."""
    group = _parallel.get_tensor_parallel_group()
    if group is None or group.size() == 1:
        return x.clone()
    small = _parallel.get_small_all_reduce()
    if small is not None and small.takes(x):
        return small(x)
    out = x.clone()
    dist.all_reduce(out, group=group)
    return out


@all_reduce.register_fake
def _(x):
    return torch.empty_like(x)


@kiln_op("linear_all_reduce")
def linear_all_reduce(x: torch.Tensor, activation: str, weights: list[torch.Tensor], biases: list[torch.Tensor],
                      w_scale: torch.Tensor | None = None) -> torch.Tensor:
    """all_reduce of a linear's output (a row-parallel linear: each rank's partial product, summed
    over the ranks), as one op (the fuse_linear_all_reduce pass): the linear is `act_and_mul_linear`'s
    when `activation` names a gated activation, else merged_linear (with w_scale, the weight-only
    GEMM of weights[0]). On two GPUs a one-row step runs it as a gemv whose programs send their
    values to the peer rank, then a launch that receives and sums (`quant_gemm.reduced_gemv`; see
    `triton_ops.FUSED_ALL_REDUCE`)."""
    if activation:
        return all_reduce(act_and_mul_linear(x, activation, weights, biases, w_scale))
    return all_reduce(_fused_linear(x, weights, biases, w_scale))


@linear_all_reduce.register_fake
def _(x, activation, weights, biases, w_scale=None):
    return x.new_empty((*x.shape[:-1], sum(w.shape[0] for w in weights)))


@kiln_op("all_gather")
def all_gather(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x [..., N, ...] on each of the W ranks -> the ranks' tensors concatenated along `dim` in rank
    order, [..., W * N, ...] (vocab-parallel logits: each rank holds a slice of the vocabulary)."""
    group = _parallel.get_tensor_parallel_group()
    if group is None or group.size() == 1:
        return x.clone()
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(group.size())]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim)


@all_gather.register_fake
def _(x, dim):
    shape = list(x.shape)
    shape[dim] *= _parallel.tensor_parallel_world_size()
    return x.new_empty(shape)
