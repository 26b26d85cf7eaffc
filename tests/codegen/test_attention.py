"""Paged decode and variable-length prefill attention kernels, the KV-cache write, and the
`kiln::attention` CUDA implementation, against a dense float64 reference and against
`kiln.ir.ops.attention`'s reference inside a forward context."""

from __future__ import annotations

import importlib

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot run")

from kiln.codegen import triton_ops  # noqa: E402
from kiln.codegen.kernels import decode_attention, prefill_attention, write_kv_cache  # noqa: E402
from kiln.ir import AttentionMetadata, ForwardContext, ops, set_forward_context  # noqa: E402

# exp overflows to inf on purpose in the soft-cap's tanh; numpy (the interpreter) warns about it
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

HEADS = [(4, 4), (8, 2)]  # (H, Hkv): GQA ratios 1 and 4


def make_batch(query_lens, seq_lens, Hkv, D, block_size, dtype, device, Dv=None, spare_blocks=3):
    """A step's metadata over random paged caches: each sequence owns scattered blocks (a random
    permutation of the pool), tables padded with 0 as the runner pads them."""
    Dv = Dv or D
    blocks_each = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_each) + spare_blocks
    pool = torch.randperm(num_blocks).tolist()
    tables = torch.zeros(len(seq_lens), max(blocks_each), dtype=torch.long)
    slots = []
    for i, (q_len, seq_len) in enumerate(zip(query_lens, seq_lens)):
        row = [pool.pop() for _ in range(blocks_each[i])]
        tables[i, : len(row)] = torch.tensor(row)
        slots += [row[p // block_size] * block_size + p % block_size for p in range(seq_len - q_len, seq_len)]
    md = AttentionMetadata(slot_mapping=torch.tensor(slots, device=device), block_tables=tables.to(device),
                           query_lens=list(query_lens), seq_lens=list(seq_lens), block_size=block_size)
    k_cache = torch.randn(num_blocks, block_size, Hkv, D, device=device).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, Hkv, Dv, device=device).to(dtype)
    return md, k_cache, v_cache


def dense_attention(q, ks, vs, q_pos, k_pos, scale, causal=True, window=0, soft_cap=0.0, sinks=None):
    """float64 attention of q [Q, H, D] over ks [K, Hkv, D], vs [K, Hkv, Dv] -> [Q, H, Dv]."""
    group = q.shape[1] // ks.shape[1]
    ks, vs = ks.double().repeat_interleave(group, 1), vs.double().repeat_interleave(group, 1)
    s = torch.einsum("qhd,khd->hqk", q.double(), ks) * scale
    if soft_cap > 0:
        s = soft_cap * torch.tanh(s / soft_cap)
    diff = q_pos[:, None] - k_pos[None, :]
    if causal:
        keep = (diff >= 0) & ((diff < window) if window > 0 else True)
    else:
        keep = diff.abs() <= window // 2 if window > 0 else torch.ones_like(diff, dtype=torch.bool)
    s = s.masked_fill(~keep.to(s.device), float("-inf"))
    if sinks is not None:
        s = torch.cat((s, sinks.double()[:, None, None].expand(-1, s.shape[1], 1)), -1)
    p = s.softmax(-1)[..., : ks.shape[0]]
    return torch.einsum("hqk,khd->qhd", p, vs)


def dense_paged(q, md, k_cache, v_cache, scale, causal=True, window=0, soft_cap=0.0, sinks=None):
    """The dense reference over every sequence of a paged batch (caches already written)."""
    out, start = [], 0
    for i, (q_len, seq_len) in enumerate(zip(md.query_lens, md.seq_lens)):
        ks = k_cache[md.block_tables[i]].flatten(0, 1)[:seq_len]
        vs = v_cache[md.block_tables[i]].flatten(0, 1)[:seq_len]
        q_pos = torch.arange(seq_len - q_len, seq_len)
        out.append(dense_attention(q[start:start + q_len], ks, vs, q_pos, torch.arange(seq_len), scale, causal, window,
                                   soft_cap, sinks))
        start += q_len
    return torch.cat(out)


def lens_tensors(md, device):
    qsl = torch.tensor([0, *torch.tensor(md.query_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return qsl, torch.tensor(md.seq_lens, dtype=torch.int32, device=device)


# ---------------------------------------------------------------- kernels against the dense reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_splits, merge_in_kernel", [(1, True), (3, True), (3, False)])
@pytest.mark.parametrize("window", [0, 6])
@pytest.mark.parametrize("H, Hkv", HEADS)
def test_decode_attention(H, Hkv, window, num_splits, merge_in_kernel, dtype, device, poisoned, close):
    seq_lens = [1, 9, 23]  # one token, and contexts spanning 3 and 6 blocks of 4
    md, k_cache, v_cache = make_batch([1, 1, 1], seq_lens, Hkv, 32, 4, dtype, device)
    q = torch.randn(3, H, 32, device=device).to(dtype)
    out = poisoned(decode_attention, q, k_cache, v_cache, md.block_tables, lens_tensors(md, device)[1], 0.2, window,
                   num_splits=num_splits, block_n=16, merge_in_kernel=merge_in_kernel)
    close(out, dense_paged(q, md, k_cache, v_cache, 0.2, window=window), dtype=dtype)


@pytest.mark.parametrize("newest_row", [True, False])
@pytest.mark.parametrize("num_splits, window", [(1, 0), (3, 0), (3, 6), (8, 0)])
def test_decode_attention_early_kv(num_splits, window, newest_row, device, poisoned, close, monkeypatch):
    """early_kv (the first tile loaded before the PDL wait, this step's token after it, as a row or
    as a masked tile: NEWEST_ROW): the same attention, with splits that hold this step's token and
    splits that do not, empty ones too."""
    monkeypatch.setattr(importlib.import_module("kiln.codegen.kernels.decode_attention"), "NEWEST_ROW", newest_row)
    md, k_cache, v_cache = make_batch([1, 1, 1, 1], [1, 9, 23, 70], 2, 32, 4, torch.bfloat16, device)
    q = torch.randn(4, 8, 32, device=device).to(torch.bfloat16)
    out = poisoned(decode_attention, q, k_cache, v_cache, md.block_tables, lens_tensors(md, device)[1], 0.2, window,
                   num_splits=num_splits, block_n=16, early_kv=True)
    close(out, dense_paged(q, md, k_cache, v_cache, 0.2, window=window), dtype=torch.bfloat16)


@pytest.mark.parametrize("cap", [64, 2])
def test_decode_attention_split_cap_switch(cap, device, poisoned, close, monkeypatch):
    """DECODE_MAX_SPLITS (KILN_DECODE_MAX_SPLITS) caps the splits of a launch that names none: the
    same attention over contexts of 1 to 70 keys, early kv loads included."""
    module = importlib.import_module("kiln.codegen.kernels.decode_attention")
    monkeypatch.setattr(module, "DECODE_MAX_SPLITS", 1 << 10)
    uncapped = module.default_num_splits(1, 2, 4096, 16, device)
    monkeypatch.setattr(module, "DECODE_MAX_SPLITS", cap)
    assert uncapped > 2 and module.default_num_splits(1, 2, 4096, 16, device) == min(cap, uncapped)
    md, k_cache, v_cache = make_batch([1, 1, 1, 1], [1, 9, 23, 70], 2, 32, 4, torch.bfloat16, device)
    q = torch.randn(4, 8, 32, device=device).to(torch.bfloat16)
    out = poisoned(decode_attention, q, k_cache, v_cache, md.block_tables, lens_tensors(md, device)[1], 0.2,
                   block_n=16, early_kv=True)
    close(out, dense_paged(q, md, k_cache, v_cache, 0.2), dtype=torch.bfloat16)


@pytest.mark.parametrize("tile", [0, 32])
def test_decode_attention_default_key_tile_switch(tile, device, poisoned, close, monkeypatch):
    """DECODE_BLOCK_N (KILN_DECODE_BLOCK_N) picks the key tile of a launch that names none: the same
    attention over contexts of 1 to 70 keys, early kv loads and splits included."""
    module = importlib.import_module("kiln.codegen.kernels.decode_attention")
    monkeypatch.setattr(module, "DECODE_BLOCK_N", tile)
    md, k_cache, v_cache = make_batch([1, 1, 1, 1], [1, 9, 23, 70], 2, 32, 4, torch.bfloat16, device)
    q = torch.randn(4, 8, 32, device=device).to(torch.bfloat16)
    out = poisoned(decode_attention, q, k_cache, v_cache, md.block_tables, lens_tensors(md, device)[1], 0.2,
                   num_splits=3, early_kv=True)
    close(out, dense_paged(q, md, k_cache, v_cache, 0.2), dtype=torch.bfloat16)


def test_in_kernel_merge_gives_the_same_output_launch_after_launch(device, poisoned, close):
    """The last split to arrive merges (an atomic count per sequence and kv head): on a GPU, where
    the splits really race, 200 launches must give one output (the merge sums in a fixed order,
    whichever program does it), the two-launch merge's up to that order, and every counter is
    back at zero after them."""
    from kiln.codegen.kernels import decode_attention as launcher
    from kiln.codegen.kernels.decode_attention import _counter_buffers

    md, k_cache, v_cache = make_batch([1] * 6, [700, 33, 1, 260, 129, 512], 8, 64, 16, torch.bfloat16, device)
    q = torch.randn(6, 32, 64, device=device).to(torch.bfloat16)
    seq = lens_tensors(md, device)[1]
    first = poisoned(launcher, q, k_cache, v_cache, md.block_tables, seq, 0.125, num_splits=16)
    close(first, launcher(q, k_cache, v_cache, md.block_tables, seq, 0.125, num_splits=16, merge_in_kernel=False))
    for _ in range(200 if device.type == "cuda" else 1):
        got = poisoned(launcher, q, k_cache, v_cache, md.block_tables, seq, 0.125, num_splits=16)
        torch.testing.assert_close(got, first, rtol=0, atol=0)
    assert not _counter_buffers[q.device].any()


@pytest.mark.parametrize("num_splits, early_kv", [(1, False), (4, False), (4, True)])
def test_decode_attention_soft_cap_sinks_value_dim(num_splits, early_kv, device, poisoned, close):
    """Soft-capped scores, attention sinks, a value head dim unlike the key's, int32 tables."""
    md, k_cache, v_cache = make_batch([1, 1], [13, 30], 2, 32, 8, torch.float32, device, Dv=48)
    q, sinks = torch.randn(2, 8, 32, device=device) * 3, torch.randn(8, device=device)
    out = poisoned(decode_attention, q, k_cache, v_cache, md.block_tables.int(), lens_tensors(md, device)[1], 0.3,
                   soft_cap=2.0, sinks=sinks, num_splits=num_splits, block_n=16, early_kv=early_kv)
    close(out, dense_paged(q, md, k_cache, v_cache, 0.3, soft_cap=2.0, sinks=sinks))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [0, 6])
@pytest.mark.parametrize("H, Hkv", HEADS)
def test_prefill_attention_paged(H, Hkv, window, dtype, device, poisoned, close):
    # a whole prompt, a decode token and a chunk of a prompt with cached context before it
    query_lens, seq_lens = [19, 1, 12], [19, 14, 27]
    md, k_cache, v_cache = make_batch(query_lens, seq_lens, Hkv, 32, 4, dtype, device)
    q = torch.randn(sum(query_lens), H, 32, device=device).to(dtype)
    qsl, lens = lens_tensors(md, device)
    out = poisoned(prefill_attention, q, k_cache, v_cache, qsl, lens, max(query_lens), 0.2, md.block_tables,
                   True, window, block_m=16, block_n=16)
    close(out, dense_paged(q, md, k_cache, v_cache, 0.2, window=window), dtype=dtype)


@pytest.mark.parametrize("causal, window", [(True, 0), (False, 0), (False, 6)])
def test_prefill_attention_no_cache(causal, window, device, poisoned, close):
    """An encoder step: whole sequences whose keys are this step's own k/v, GQA, bidirectional
    with ModernBERT's centred window; sinks and soft cap on the way."""
    query_lens = [7, 20, 1]
    T, H, Hkv, D = sum(query_lens), 8, 2, 24
    q, k, v = (torch.randn(T, h, D, device=device) for h in (H, Hkv, Hkv))
    sinks = torch.randn(H, device=device)
    qsl = torch.tensor([0, 7, 27, 28], dtype=torch.int32, device=device)
    out = poisoned(prefill_attention, q, k, v, qsl, qsl[1:] - qsl[:-1], 20, 0.25, None, causal, window, 4.0, sinks,
                   block_m=16, block_n=16)
    ref = torch.cat([dense_attention(q[s:e], k[s:e], v[s:e], torch.arange(e - s), torch.arange(e - s), 0.25, causal,
                                     window, 4.0, sinks) for s, e in zip(qsl[:-1].tolist(), qsl[1:].tolist())])
    close(out, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_cache(dtype, device):
    T, Hkv, D, block_size, num_blocks = 7, 2, 40, 4, 5
    # in the cache's dtype, as the model writes it (the interpreter's float32 -> bfloat16 cast truncates)
    k, v = (torch.randn(T, Hkv, D, device=device).to(dtype) for _ in range(2))
    slots = torch.randperm(num_blocks * block_size, device=device)[:T]
    slots[2] = -1  # a padding token: skipped
    k_cache = torch.randn(num_blocks, block_size, Hkv, D, device=device).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, Hkv, D, device=device).to(dtype)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    write_kv_cache(k, v, k_cache, v_cache, slots)
    keep = slots >= 0
    ref_k.flatten(0, 1).index_copy_(0, slots[keep], k[keep])
    ref_v.flatten(0, 1).index_copy_(0, slots[keep], v[keep])
    torch.testing.assert_close(k_cache, ref_k, rtol=0, atol=0)
    torch.testing.assert_close(v_cache, ref_v, rtol=0, atol=0)


# ---------------------------------------------------------------- kiln::attention's CUDA implementation


STEPS = {  # name -> (query_lens, seq_lens)
    "decode": ([1, 1, 1, 1], [3, 17, 9, 33]),
    "mixed": ([6, 1, 11], [6, 21, 30]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [0, 8])
@pytest.mark.parametrize("step", list(STEPS))
def test_attention_op_matches_reference(step, window, dtype, device, poisoned, close):
    """Inside a forward context, on the same inputs: the same output as ops.attention's reference
    and the same caches after it (this step's k/v written at slot_mapping)."""
    query_lens, seq_lens = STEPS[step]
    H, Hkv, D = 8, 2, 32
    md, k_cache, v_cache = make_batch(query_lens, seq_lens, Hkv, D, 4, dtype, device)
    T = sum(query_lens)
    q, k, v = (torch.randn(T, h, D, device=device).to(dtype) for h in (H, Hkv, Hkv))
    ref_caches = [(k_cache.clone(), v_cache.clone())]
    with set_forward_context(ForwardContext(md, [(k_cache, v_cache)])):
        out = poisoned(triton_ops.attention, q, k, v, 0, 0.2, window)
    with set_forward_context(ForwardContext(md, ref_caches)):
        ref = ops.attention(q, k, v, 0, 0.2, window)
    torch.testing.assert_close(k_cache, ref_caches[0][0], rtol=0, atol=0)
    torch.testing.assert_close(v_cache, ref_caches[0][1], rtol=0, atol=0)
    close(out, ref)
    close(out, dense_paged(q, md, k_cache, v_cache, 0.2, window=window), dtype=dtype)


def test_attention_op_soft_cap_and_sinks(device, poisoned, close):
    md, k_cache, v_cache = make_batch([1, 1], [10, 25], 2, 32, 4, torch.float32, device)
    q, k, v = (torch.randn(2, h, 32, device=device) for h in (8, 2, 2))
    sinks = torch.randn(8, device=device)
    ref_caches = [(k_cache.clone(), v_cache.clone())]
    with set_forward_context(ForwardContext(md, [(k_cache, v_cache)])):
        out = poisoned(triton_ops.attention, q, k, v, 0, 0.3, 0, True, 3.0, sinks)
    with set_forward_context(ForwardContext(md, ref_caches)):
        ref = ops.attention(q, k, v, 0, 0.3, 0, True, 3.0, sinks)
    close(out, ref)


@pytest.mark.parametrize("step", list(STEPS))
def test_attention_op_alibi(step, device, poisoned, close):
    """ALiBi slopes (BLOOM's, for 8 heads) through the decode and prefill kernels, and with no
    cache: the reference's output (which matches HF BLOOM end to end, tests/models)."""
    from kiln.models.bloom import alibi_slopes

    query_lens, seq_lens = STEPS[step]
    H, D = 8, 32
    md, k_cache, v_cache = make_batch(query_lens, seq_lens, H, D, 4, torch.float32, device)
    T = sum(query_lens)
    q, k, v = (torch.randn(T, H, D, device=device) for _ in range(3))
    slopes = alibi_slopes(H).to(device)
    ref_caches = [(k_cache.clone(), v_cache.clone())]
    with set_forward_context(ForwardContext(md, [(k_cache, v_cache)])):
        out = poisoned(triton_ops.attention, q, k, v, 0, 0.2, alibi_slopes=slopes)
    with set_forward_context(ForwardContext(md, ref_caches)):
        ref = ops.attention(q, k, v, 0, 0.2, alibi_slopes=slopes)
        plain = ops.attention(q, k, v, 0, 0.2, kv_written=True)
    close(out, ref)
    assert (ref - plain).abs().max() > 1e-2  # the bias changes the result
    no_cache = AttentionMetadata(slot_mapping=torch.zeros(T, dtype=torch.long, device=device),
                                 block_tables=torch.zeros(len(query_lens), 1, dtype=torch.long, device=device),
                                 query_lens=query_lens, seq_lens=query_lens, block_size=16)
    with set_forward_context(ForwardContext(no_cache, None)):
        close(poisoned(triton_ops.attention, q, k, v, 0, 0.2, alibi_slopes=slopes),
              ops.attention(q, k, v, 0, 0.2, alibi_slopes=slopes))


@pytest.mark.parametrize("causal, window", [(False, 0), (False, 4), (True, 0)])
def test_attention_op_without_cache(causal, window, device, poisoned, close):
    """A pooling / encoder step: no KV cache, whole sequences, bidirectional or causal."""
    query_lens = [5, 9, 2]
    T, H, Hkv, D = sum(query_lens), 4, 4, 16
    md = AttentionMetadata(slot_mapping=torch.zeros(T, dtype=torch.long, device=device),
                           block_tables=torch.zeros(3, 1, dtype=torch.long, device=device),
                           query_lens=query_lens, seq_lens=query_lens, block_size=16)
    q, k, v = (torch.randn(T, h, D, device=device) for h in (H, Hkv, Hkv))
    with set_forward_context(ForwardContext(md, None)):
        out = poisoned(triton_ops.attention, q, k, v, 0, 0.25, window, causal)
        ref = ops.attention(q, k, v, 0, 0.25, window, causal)
    close(out, ref)


def test_register_cuda_kernels_is_idempotent():
    assert triton_ops.register_cuda_kernels() is True
    assert triton_ops.register_cuda_kernels() is True
    for name in ("rms_norm", "add_rms_norm", "silu_and_mul", "gelu_and_mul", "rotary", "attention"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"kiln::{name}", "CUDA"), name


def test_register_cuda_kernels_without_triton(monkeypatch):
    monkeypatch.setattr(triton_ops, "_registered", False)
    monkeypatch.setitem(__import__("sys").modules, "triton", None)  # `import triton` raises ImportError
    assert triton_ops.register_cuda_kernels() is False
