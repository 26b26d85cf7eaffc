"""One token's q/k/v projection and its decode attention in one launch (batch 1).

At batch 1 a launch boundary costs about 2 us on an H100: between the q/k/v and o gemvs an empty
kernel adds 2.03 us a layer, the decode attention 4.21 (`benchmarks/attention_chain.py`, session
26). Here the attention joins the q/k/v gemv's launch (`quant_gemm.rope_gemv`: the norm in its
prologue, rotary and the cache write in its epilogue), so the boundary between them goes:

- the grid is the gemv's programs, then HKV x num_splits attention programs, each one split of the
  decode kernel (`decode_attention.decode_split`). This relies on the GPU dispatching a grid's
  blocks in index order (as NVIDIA's do): every gemv program is then running or done before an
  attention program starts, so one that waits never holds back one it waits for. Were that ever
  not so, a waiting program gives up after `decode_attention.MAX_SPINS` polls with a device assert
  (an error, not a hang);
- each gemv program, once its q, k or v columns are stored (a barrier, then one thread's release),
  counts itself in for its kv head (`handoff_arrive`);
- an attention program loads its older keys and values first (as the decode kernel's early kv
  loads do), waits for the kernel before (PDL: the protocol's wait before any store), then until
  its kv head's count is complete (acquire), and goes on as the decode kernel does. The merge's
  last program puts both counts back to 0.

All programs share one register allocation, so the attention runs at the gemv's warps, and the
launch is capped at the q/k/v tiles' own 77-80 registers a thread (`quant_gemm._linear`), lest the
attention cost the gemv blocks an SM. ptxas (sm_90a, Triton 3.6, the launch's divisibility hints),
the whole launch under that cap: the 1B's bf16 tile (8 warps, heads of 64) spills 80 bytes with
128-key tiles and none with 64; 8B's deep tile (8 warps, heads of 128) 84 with 64-key tiles and 8
with 32 (122 registers uncapped); the 8-bit tile (4 warps, heads of 64) 120 with 64-key tiles, 20
with 32, none with 16 (128 registers uncapped, against the gemv's 79). So its key tile defaults to
what spills least (`_TILES`; `HANDOFF_BLOCK_N` overrides it). bf16/fp16 caches, no sliding window, soft cap, sinks or
ALiBi: those keep `rope_gemv` and `decode_attention` apart. Not in the pipeline yet: it is timed
first as a row of `attention_chain.py`.
"""

from __future__ import annotations

import importlib
import os

import torch

from kiln.codegen.kernels.attention_common import block_dim, check_cache, dot_upcast
from kiln.codegen.kernels.pdl import launch_args
from kiln.codegen.kernels.quant_gemm import Handoff, Rope, _num_sms, _rope_config, pick_config, rope_gemv

# (the package re-exports the launcher under the module's name)
decode_module = importlib.import_module("kiln.codegen.kernels.decode_attention")

# Whether the engine's one-sequence decode steps run the q/k/v gemv and the attention in one launch
# (`triton_ops`, where the fuse_rope_attention pass joined their ops). Off until timed on a GPU:
# `benchmarks/attention_chain.py` has it as the "handoff" rows, `decode_latency.py --compare-switches
# handoff=1` in the whole step; KILN_HANDOFF=1 for a process.
HANDOFF = os.environ.get("KILN_HANDOFF", "0") == "1"

# Its key tile when the caller names none; 0: `_TILES`' (see above). KILN_HANDOFF_BLOCK_N=N for a process.
HANDOFF_BLOCK_N = int(os.environ.get("KILN_HANDOFF_BLOCK_N", "0"))

# (the gemv's warps, the head dim's tile) -> keys a tile; 16 for any other
_TILES = {(8, 64): 64, (8, 128): 32, (4, 64): 16}


def takes(k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """Whether `qkv_attention` takes a layer of these caches and heads now: bf16/fp16 caches, and
    its counters there (they are made outside graph capture: a capture that finds none, with no
    run before it, keeps the two launches)."""
    return (k_cache.dtype in (torch.bfloat16, torch.float16) and v_cache.dtype == k_cache.dtype
            and num_heads % num_kv_heads == 0 and block_dim(head_dim) == block_dim(v_cache.shape[-1])
            and decode_module._counters(k_cache.device, 2 * num_kv_heads) is not None)


def qkv_attention(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                  w: torch.Tensor, bias: torch.Tensor | None, rope: Rope, block_tables: torch.Tensor,
                  seq_lens: torch.Tensor, scale: float, num_splits: int | None = None, block_n: int | None = None,
                  early_kv: bool | None = None, config=None, static_weight: bool = True,
                  w_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """`rope_gemv(x, residual, norm_weight, eps, w, bias, rope)` and then `decode_attention(q,
    rope.k_cache, rope.v_cache, block_tables, seq_lens, scale)` of its q, for one sequence, in one
    launch -> (the projection [1, N], x + residual or None, the attention [1, H, DV]). The
    splits and early kv loads default as `decode_attention`'s do, the key tile to HANDOFF_BLOCK_N's."""
    k_cache, v_cache = rope.k_cache, rope.v_cache
    check_cache("k_cache", k_cache)
    check_cache("v_cache", v_cache)
    H, HKV, D, DV = rope.num_heads, rope.num_kv_heads, rope.head_dim, v_cache.shape[-1]
    if not takes(k_cache, v_cache, H, HKV, D):
        raise ValueError(f"qkv_attention: bf16 or fp16 caches only, {H} q heads over {HKV} kv heads, keys and values "
                         f"of one tile width; got {k_cache.dtype} / {v_cache.dtype} caches, heads of {D} / {DV}")
    if block_tables.dim() != 2 or block_tables.shape[0] != 1 or seq_lens.numel() != 1:
        raise ValueError(f"qkv_attention: one sequence, got block tables {tuple(block_tables.shape)} and "
                         f"{seq_lens.numel()} lengths")
    device = x.device
    block_d = block_dim(D)
    # the gemv's tiling, as rope_gemv would pick it: its warps are the attention's
    config = config or pick_config(1, w.shape[0], w.shape[1], x.dtype, _num_sms(device), w.dtype, rope=True)
    config = _rope_config(config, rope, None)
    if block_n is None:
        block_n = HANDOFF_BLOCK_N or _TILES.get((config.num_warps, block_d), 16)
    if num_splits is None:
        num_splits = decode_module.default_num_splits(1, HKV, block_tables.shape[1] * k_cache.shape[1], block_n,
                                                      device)
    counters = decode_module._counters(device, 2 * HKV)
    if counters is None:
        raise RuntimeError("qkv_attention: its counters are made outside graph capture; run it once before capturing")
    if early_kv is None:
        early_kv = (decode_module.EARLY_KV and launch_args(device)["PDL"]
                    and torch.cuda.is_current_stream_capturing())
    out = torch.empty((1, H, DV), dtype=x.dtype, device=device)
    part_acc = torch.empty((1, H, num_splits, DV), dtype=torch.float32, device=device)
    part_ml = torch.empty((1, H, num_splits, 2), dtype=torch.float32, device=device)
    handoff = Handoff(
        HKV * num_splits, block_tables, seq_lens, out, part_acc, part_ml, counters, scale, H // HKV,
        dict(ATTEND=True, A_SPLITS=num_splits, A_BLOCK_N=block_n, A_BLOCK_G=block_dim(H // HKV), A_BLOCK_D=block_d,
             A_EARLY_KV=bool(early_kv), A_NEWEST_ROW=decode_module.newest_row(block_d, block_d), A_UPCAST=dot_upcast(k_cache.dtype)))
    qkv, summed = rope_gemv(x, residual, norm_weight, eps, w, bias, rope, config, static_weight, w_scale, handoff)
    return qkv, summed, out
