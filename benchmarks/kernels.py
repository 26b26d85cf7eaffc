"""kiln's Triton kernels against the reference ops: correctness and time, at model sizes.

For each kernel and size: the relative error ||out - ref|| / ||ref|| against the reference op run
in float32 on upcast inputs; the median time (`triton.testing.do_bench`, which flushes L2 between
runs) of the reference op and of the Triton launcher called eagerly, which at small sizes is mostly
Python launch cost, and of the launcher captured in a CUDA graph (as the decode step runs), which
is the device time; and the bandwidth the kernel achieves (from the graph time) over the fewest
bytes it must move (each input read once, each output written once), next to the
device-to-device copy bandwidth measured in the same run (bytes read plus written). Prefill
attention is compute-bound: its row also gives TFLOP/s (causal: 2 * 2 * q * k * D / 2 per head).
'x' is the reference's time over the kernel's device time (graph ms where there is one).
Sizes follow Llama-3.2-1B (hidden 2048, 32 heads, 8 kv heads, head dim 64, intermediate 8192) and
an 8B-like hidden 4096 / head dim 128; decode attention runs batch 1..256 at 1K and 4K context
over a paged cache of 16-token blocks with scattered block tables.

The quantized section (`--only quant`) times the per-token quantization kernels and the 8-bit
GEMMs on Llama-3.2-1B's linears (qkv 3072x2048, o 2048x2048, gate_up 16384x2048, down 2048x8192,
lm_head 128256x2048): weight_only_linear int8/fp8 at M=1, whose floor is the weight bytes over
bandwidth (GB/s counts the bytes read: 8-bit weights, scales, activations, plus the output),
next to bf16 F.linear on the same shape (its own row, and 'x' = bf16 time / quantized time); and
scaled_linear fp8 (torch._scaled_mm and the Triton fallback) and int8 at M=1 and M=4096, with
TFLOP/s. `--sweep` instead times every weight-only tiling of a grid per shape and M (CUDA
graphs, L2 flushed, each output checked) and prints the best few against the default;
`--sweep-chain N` times each as N launches back to back over N weight copies, per launch, so
each overlaps the previous one's tail (PDL) as in a decode step (the defaults were chosen so).

    python benchmarks/kernels.py                 # everything, bfloat16
    python benchmarks/kernels.py --only attention --dtype float16
    python benchmarks/kernels.py --only quant
    python benchmarks/kernels.py --sweep --sweep-m 1,16 --sweep-kinds int8 --sweep-shapes qkv,down
    python benchmarks/kernels.py --sweep --sweep-kinds bf16      # the gemv on float weights vs cuBLAS
    python benchmarks/kernels.py --sweep --sweep-kinds bf16,int8,fp8 --sweep-chain 8
    python benchmarks/kernels.py --sweep --sweep-kinds bf16 --sweep-chain 8 --sweep-model llama-8b-tp2

`--sweep-model` picks whose linears: the Llama-3.2-1B shape (default; the tiles' roles were
measured there), the Llama-3.1-8B shape, or one rank's of it under two-way tensor parallelism,
where the roles' thresholds put different matrices in each role (gate_up is "narrow" there).
"""

from __future__ import annotations

import argparse
import sys

import torch

from kiln.ir import AttentionMetadata, ForwardContext, ops, set_forward_context


def rel_error(out, ref) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class Table:
    def __init__(self, copy_gbs: float):
        self.copy_gbs = copy_gbs
        self.rows = []
        print(f"{'kernel':<22} {'shape':<30} {'MB':>8} {'ref ms':>8} {'triton ms':>9} {'graph ms':>8} {'x':>6} "
              f"{'GB/s':>6} {'%copy':>5} {'TFLOP/s':>7} {'rel err':>8}", flush=True)

    def add(self, name, shape, bytes_moved, ref_ms, ms, err, flops=None, graph=None):
        """graph: the time of the launcher captured in a CUDA graph; None when it cannot be captured
        (the kiln::attention op builds its length tensors from Python lists)."""
        device_ms = graph if graph is not None else ms
        gbs = bytes_moved / device_ms / 1e6
        tflops = f"{flops / device_ms / 1e9:7.1f}" if flops else f"{'':>7}"
        graph_col = f"{graph:8.4f}" if graph is not None else f"{'-':>8}"
        line = (f"{name:<22} {shape:<30} {bytes_moved / 1e6:8.2f} {ref_ms:8.4f} {ms:9.4f} {graph_col} "
                f"{ref_ms / device_ms:6.1f} {gbs:6.0f} {100 * gbs / self.copy_gbs:4.0f}% {tflops} {err:8.1e}")
        self.rows.append(line)
        print(line, flush=True)


def bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def bench_graph(fn) -> float:
    """Median time of fn captured in a CUDA graph (after a warm-up call that compiles it)."""
    from triton.testing import do_bench

    fn()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return do_bench(graph.replay, warmup=25, rep=100, return_mode="median")


def timed(fn) -> tuple[float, float]:
    """(eager ms, graph ms) of a Triton launcher."""
    return bench(fn), bench_graph(fn)


def copy_bandwidth(device) -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.numel() / ms / 1e6


def bench_norms(table, dtype, device, K):
    for T in (1, 256, 4096):
        for E in (2048, 4096):
            x, r = (torch.randn(T, E, device=device, dtype=dtype) for _ in range(2))
            w = torch.randn(E, device=device, dtype=dtype)
            out = K.rms_norm(x, w, 1e-6)
            err = rel_error(out, ops.rms_norm(x.float(), w.float(), 1e-6))
            ms, graph = timed(lambda: K.rms_norm(x, w, 1e-6))
            table.add("rms_norm", f"T={T} E={E}", nbytes(x, w, out), bench(lambda: ops.rms_norm(x, w, 1e-6)), ms, err,
                      graph=graph)
            out, summed = K.add_rms_norm(x, r, w, 1e-6)
            ref_out, _ = ops.add_rms_norm(x.float(), r.float(), w.float(), 1e-6)
            ms, graph = timed(lambda: K.add_rms_norm(x, r, w, 1e-6))
            table.add("add_rms_norm", f"T={T} E={E}", nbytes(x, r, w, out, summed),
                      bench(lambda: ops.add_rms_norm(x, r, w, 1e-6)), ms, rel_error(out, ref_out), graph=graph)


def bench_activations(table, dtype, device, K):
    for T in (1, 256, 4096):
        for F in (8192, 14336):
            x = torch.randn(T, 2 * F, device=device, dtype=dtype)
            out = K.silu_and_mul(x)
            ms, graph = timed(lambda: K.silu_and_mul(x))
            table.add("silu_and_mul", f"T={T} F={F}", nbytes(x, out), bench(lambda: ops.silu_and_mul(x)), ms,
                      rel_error(out, ops.silu_and_mul(x.float())), graph=graph)
        x = torch.randn(T, 2 * 8192, device=device, dtype=dtype)
        for approx in ("none", "tanh"):
            out = K.gelu_and_mul(x, approx)
            ms, graph = timed(lambda: K.gelu_and_mul(x, approx))
            table.add(f"gelu_and_mul[{approx}]", f"T={T} F=8192", nbytes(x, out),
                      bench(lambda: ops.gelu_and_mul(x, approx)), ms,
                      rel_error(out, ops.gelu_and_mul(x.float(), approx)), graph=graph)


def bench_rotary(table, dtype, device, K):
    for H, HKV, D in ((32, 8, 64), (32, 8, 128)):
        inv_freq = 1.0 / (500000 ** (torch.arange(0, D, 2, device=device).float() / D))
        freqs = torch.arange(8192, device=device).float()[:, None] * inv_freq
        cache = torch.cat((freqs.cos(), freqs.sin()), -1)
        for T in (1, 256, 4096):
            q = torch.randn(T, H, D, device=device, dtype=dtype)
            k, v = (torch.randn(T, HKV, D, device=device, dtype=dtype) for _ in range(2))
            pos = torch.randint(0, 8192, (T,), device=device)
            oq, ok = K.rotary(q, k, pos, cache, True)
            rq, rk = ops.rotary(q.float(), k.float(), pos, cache, True)
            err = max(rel_error(oq, rq), rel_error(ok, rk))
            moved = 2 * nbytes(q, k) + nbytes(pos) + T * D * 4
            ms, graph = timed(lambda: K.rotary(q, k, pos, cache, True))
            table.add("rotary", f"T={T} H={H}/{HKV} D={D}", moved, bench(lambda: ops.rotary(q, k, pos, cache, True)),
                      ms, err, graph=graph)
            block_size = 16
            num_blocks = triton_cdiv(T, block_size) + 8
            k_cache, v_cache = (torch.zeros(num_blocks, block_size, HKV, D, device=device, dtype=dtype)
                                for _ in range(2))
            slots = torch.randperm(num_blocks * block_size, device=device)[:T]

            def reference():
                rq, rk = ops.rotary(q, k, pos, cache, True)
                k_cache.flatten(0, 1).index_copy_(0, slots, rk)
                v_cache.flatten(0, 1).index_copy_(0, slots, v)
                return rq, rk

            oq, ok = K.rotary_kv_cache(q, k, v, pos, cache, True, k_cache, v_cache, slots)
            err = max(rel_error(oq, rq), rel_error(ok, rk), rel_error(k_cache.flatten(0, 1)[slots], rk))
            moved = 2 * nbytes(q, k) + 2 * nbytes(k, v) + nbytes(pos, slots) + T * D * 4
            ms, graph = timed(lambda: K.rotary_kv_cache(q, k, v, pos, cache, True, k_cache, v_cache, slots))
            table.add("rotary_kv_cache", f"T={T} H={H}/{HKV} D={D}", moved, bench(reference), ms, err, graph=graph)


def triton_cdiv(a, b):
    return -(-a // b)


def paged_batch(query_lens, seq_lens, H, HKV, D, block_size, dtype, device):
    """Metadata and caches of one step: scattered blocks, random cache contents."""
    blocks_each = [triton_cdiv(n, block_size) for n in seq_lens]
    num_blocks = sum(blocks_each) + 16
    pool = torch.randperm(num_blocks)
    tables = torch.zeros(len(seq_lens), max(blocks_each), dtype=torch.long)
    slots, used = [], 0
    for i, (q_len, seq_len) in enumerate(zip(query_lens, seq_lens)):
        row = pool[used:used + blocks_each[i]]
        used += blocks_each[i]
        tables[i, :len(row)] = row
        pos = torch.arange(seq_len - q_len, seq_len)
        slots.append(row[pos // block_size] * block_size + pos % block_size)
    md = AttentionMetadata(slot_mapping=torch.cat(slots).to(device), block_tables=tables.to(device),
                           query_lens=list(query_lens), seq_lens=list(seq_lens), block_size=block_size)
    k_cache, v_cache = (torch.randn(num_blocks, block_size, HKV, D, device=device, dtype=dtype) for _ in range(2))
    T = sum(query_lens)
    q = torch.randn(T, H, D, device=device, dtype=dtype)
    k, v = (torch.randn(T, HKV, D, device=device, dtype=dtype) for _ in range(2))
    return md, k_cache, v_cache, q, k, v


def bench_attention(table, dtype, device, K, triton_ops):
    H, HKV, D, block_size = 32, 8, 64, 16
    scale = D ** -0.5
    for ctx_len in (1024, 4096):
        for B in (1, 8, 32, 64, 128, 256):
            md, k_cache, v_cache, q, k, v = paged_batch([1] * B, [ctx_len] * B, H, HKV, D, block_size, dtype, device)
            caches = [(k_cache, v_cache)]
            seq_lens = torch.tensor(md.seq_lens, dtype=torch.int32, device=device)
            with set_forward_context(ForwardContext(md, [(k_cache.float(), v_cache.float())])):
                ref = ops.attention(q.float(), k.float(), v.float(), 0, scale)
            with set_forward_context(ForwardContext(md, caches)):
                ops.attention(q, k, v, 0, scale)  # this step's k/v into the cache, for the kernel's read
                out = K.decode_attention(q, k_cache, v_cache, md.block_tables, seq_lens, scale)
                ref_ms = bench(lambda: ops.attention(q, k, v, 0, scale))
                ms, graph = timed(lambda: K.decode_attention(q, k_cache, v_cache, md.block_tables, seq_lens, scale))
                op_ms = bench(lambda: triton_ops.attention(q, k, v, 0, scale))
            kv_bytes = 2 * B * ctx_len * HKV * D * k_cache.element_size()
            moved = kv_bytes + nbytes(q, out, seq_lens) + 8 * B * (ctx_len // block_size)  # + block tables
            shape = f"B={B} ctx={ctx_len} H={H}/{HKV}"
            table.add("decode_attention", shape, moved, ref_ms, ms, rel_error(out, ref), graph=graph)
            table.add("  kiln::attention op", shape, moved + nbytes(k, v) * 2, ref_ms, op_ms, rel_error(out, ref))
            del md, k_cache, v_cache, caches
    for B, q_len in ((1, 1024), (1, 4096), (4, 2048), (16, 512)):
        md, k_cache, v_cache, q, k, v = paged_batch([q_len] * B, [q_len] * B, H, HKV, D, block_size, dtype, device)
        with set_forward_context(ForwardContext(md, [(k_cache, v_cache)])):
            ref_ms = bench(lambda: ops.attention(q, k, v, 0, scale))
            ms = bench(lambda: triton_ops.attention(q, k, v, 0, scale))
            out = triton_ops.attention(q, k, v, 0, scale)
        with set_forward_context(ForwardContext(md, [(k_cache.float(), v_cache.float())])):
            ref = ops.attention(q.float(), k.float(), v.float(), 0, scale)
        moved = nbytes(q, out) + 2 * nbytes(k, v)
        flops = B * H * 4 * q_len * q_len * D / 2
        qsl = torch.arange(0, B * q_len + 1, q_len, dtype=torch.int32, device=device)
        seq_lens = torch.full((B,), q_len, dtype=torch.int32, device=device)
        graph = bench_graph(lambda: K.prefill_attention(q, k_cache, v_cache, qsl, seq_lens, q_len, scale,
                                                        md.block_tables))
        table.add("prefill (kiln::attn)", f"B={B} q={q_len} H={H}/{HKV}", moved, ref_ms, ms, rel_error(out, ref), flops,
                  graph=graph)


LLAMA_1B_LINEARS = (("qkv", 3072, 2048), ("o", 2048, 2048), ("gate_up", 16384, 2048), ("down", 2048, 8192),
                    ("lm_head", 128256, 2048))
# --sweep-model: the linears (name, N, K) of one rank of other shapes, for the gemv's tiles there
SWEEP_MODELS = {
    "llama-1b": LLAMA_1B_LINEARS,
    "llama-8b": (("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336),
                 ("lm_head", 128256, 4096)),
    # one of two tensor-parallel ranks: heads, the MLP's width and the vocabulary halved
    "llama-8b-tp2": (("qkv", 3072, 4096), ("o", 4096, 2048), ("gate_up", 14336, 4096), ("down", 4096, 7168),
                     ("lm_head", 64128, 4096)),
}


def bench_quant_rows(table, dtype, device, K):
    from kiln.ir import quant_ops as Q

    for T in (1, 256, 4096):
        E, F = 2048, 8192
        x = torch.randn(T, E, device=device, dtype=dtype)
        w = torch.randn(E, device=device, dtype=dtype)
        g = torch.randn(T, 2 * F, device=device, dtype=dtype)
        for kind in ("int8", "fp8"):
            q, s = K.quantize(x, kind)
            rq, rs = Q.quantize(x.float(), kind)
            ms, graph = timed(lambda: K.quantize(x, kind))
            table.add(f"quantize[{kind}]", f"T={T} K={E}", nbytes(x, q, s), bench(lambda: Q.quantize(x, kind)), ms,
                      rel_error(q.float() * s, rq.float() * rs), graph=graph)
            q, s = K.rms_norm_quant(x, w, 1e-6, kind)
            rq, rs = Q.rms_norm_quant(x.float(), w.float(), 1e-6, kind)
            ms, graph = timed(lambda: K.rms_norm_quant(x, w, 1e-6, kind))
            table.add(f"rms_norm_quant[{kind}]", f"T={T} E={E}", nbytes(x, w, q, s),
                      bench(lambda: Q.rms_norm_quant(x, w, 1e-6, kind)), ms, rel_error(q.float() * s, rq.float() * rs),
                      graph=graph)
            q, s = K.silu_and_mul_quant(g, kind)
            rq, rs = Q.silu_and_mul_quant(g.float(), kind)
            ms, graph = timed(lambda: K.silu_and_mul_quant(g, kind))
            table.add(f"silu_mul_quant[{kind}]", f"T={T} F={F}", nbytes(g, q, s),
                      bench(lambda: Q.silu_and_mul_quant(g, kind)), ms, rel_error(q.float() * s, rq.float() * rs),
                      graph=graph)


def bench_quant_gemms(table, dtype, device, K):
    """Weight-only at M=1 and W8A8 at M=1 / 4096 against bf16 F.linear (graph times both)."""
    import torch.nn.functional as F

    from kiln.codegen.kernels import quant_gemm
    from kiln.ir import quant_ops as Q

    for name, N, Kd in LLAMA_1B_LINEARS:
        x = torch.randn(1, Kd, device=device, dtype=dtype)
        w = torch.randn(N, Kd, device=device, dtype=dtype) * Kd ** -0.5
        shape = f"M=1 N={N} K={Kd} {name}"
        ref_ms = bench_graph(lambda: F.linear(x, w))
        table.add("  bf16 F.linear", shape, nbytes(x, w) + N * x.element_size(), ref_ms, ref_ms, 0.0, graph=ref_ms)
        for kind in ("int8", "fp8"):
            wq, ws = Q.quantize_weight(w, kind)
            out = K.weight_only_linear(x, wq, ws, None)
            truth = F.linear(x.float(), Q.dequantize_weight(wq, ws))
            ms, graph = timed(lambda: K.weight_only_linear(x, wq, ws, None))
            table.add(f"wo_linear[{kind}]", shape, nbytes(x, wq, ws, out), ref_ms, ms, rel_error(out, truth),
                      graph=graph)
    for M in (1, 4096):
        for name, N, Kd in LLAMA_1B_LINEARS if M == 1 else LLAMA_1B_LINEARS[:4]:
            x = torch.randn(M, Kd, device=device, dtype=dtype)
            w = torch.randn(N, Kd, device=device, dtype=dtype) * Kd ** -0.5
            shape, flops = f"M={M} N={N} K={Kd} {name}", 2 * M * N * Kd
            ref_ms = bench_graph(lambda: F.linear(x, w))
            table.add("  bf16 F.linear", shape, nbytes(x, w) + M * N * x.element_size(), ref_ms, ref_ms, 0.0, flops,
                      graph=ref_ms)
            for kind, backends in (("fp8", ("scaled_mm", "triton")), ("int8", ("triton",))):
                xq, xs = Q.quantize(x, kind)
                wq, ws = Q.quantize_weight(w, kind)
                truth = (xq.float() @ wq.float().t()) * xs * ws
                for backend in backends:
                    if backend == "scaled_mm" and quant_gemm.scaled_linear_backend(xq, wq, None, dtype) != backend:
                        continue

                    def run():
                        return K.scaled_linear(xq, xs, wq, ws, None, dtype, backend=backend)

                    out = run()
                    ms, graph = timed(run)
                    table.add(f"scaled[{kind},{'_scaled_mm' if backend == 'scaled_mm' else backend}]", shape,
                              nbytes(xq, xs, wq, ws, out), ref_ms, ms, rel_error(out, truth), flops, graph=graph)


def _weight_only_grid(M: int) -> list:
    """The tilings --sweep tries at M (besides the default): gemv at M == 1, dot tiles above."""
    from kiln.codegen.kernels.quant_gemm import GemmConfig

    if M == 1:  # (the dot kernel never won at one row)
        return [GemmConfig("gemv", 1, bn, bk, sk, num_warps=nw, num_stages=3)
                for bn in (2, 4, 8, 16) for bk in (512, 1024, 2048) for sk in (1, 2, 4, 8) for nw in (4, 8)]
    grid = []
    bm = 16 if M <= 16 else 64
    grid += [GemmConfig("dot", bm, bn, bk, sk, num_warps=4, num_stages=ns)
             for bn in (16, 32, 64) for bk in (128, 256) for sk in (1, 2, 4) for ns in (3, 4)]
    return grid


def sweep_weight_only(dtype, device, K, copy_gbs, ms, kinds, shapes, chain=1, linears=LLAMA_1B_LINEARS):
    """Every tiling of `_weight_only_grid` per (M, kind, shape): graph-replay time, GB/s of the
    fewest bytes, and the output checked against float32; the best six and the default.
    chain > 1: each graph launches the linear `chain` times back to back, over as many copies of
    the weight (none is in L2 when read), and the time is per launch: as in a decode step, where
    a kernel's launch and ramp overlap the previous one's tail (PDL), which one launch alone shows
    as a fixed cost of several microseconds."""
    import torch.nn.functional as F
    from triton.testing import do_bench

    from kiln.codegen.kernels import quant_gemm
    from kiln.ir import quant_ops as Q

    def graph_ms(fn):
        fn()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return do_bench(g.replay, warmup=10, rep=40, return_mode="median")

    def fmt(c):
        return (f"{c.kernel} m{c.block_m} n{c.block_n} k{c.block_k} split{c.split_k} w{c.num_warps} "
                f"s{c.num_stages}")

    summary = []
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    for M in ms:
        for kind in kinds:
            for name, N, Kd in (s for s in linears if s[0] in shapes):
                x = torch.randn(M, Kd, device=device, dtype=dtype)
                w = torch.randn(N, Kd, device=device) * Kd ** -0.5
                if kind == "bf16":  # float weights in the run's dtype, scale 1: the kernels against cuBLAS
                    wq, ws = w.to(dtype), None
                    truth = F.linear(x.float(), wq.float())
                    moved = nbytes(x, wq) + M * N * x.element_size()
                    copies = [wq] + [wq.clone() for _ in range(chain - 1)]
                    cublas = graph_ms(lambda: [F.linear(x, c) for c in copies]) / chain
                    print(f"\nF.linear (cuBLAS) M={M} N={N} K={Kd} ({name}): {cublas:.4f} ms "
                          f"{100 * moved / cublas / 1e6 / copy_gbs:.0f}%copy")
                else:
                    cublas = None
                    wq, ws = Q.quantize_weight(w, kind)
                    truth = F.linear(x.float(), Q.dequantize_weight(wq, ws))
                    moved = nbytes(x, wq, ws) + M * N * x.element_size()
                    copies = [wq] + [wq.clone() for _ in range(chain - 1)]
                default = quant_gemm.pick_config(M, N, Kd, dtype, sms, wq.dtype)
                results, failed = [], []
                for cfg in dict.fromkeys([default, *_weight_only_grid(M)]):
                    def run(cfg=cfg, weights=(wq,)):
                        for c in weights:
                            if ws is None:
                                out = quant_gemm.float_linear(x, c, None, config=cfg)
                            else:
                                out = K.weight_only_linear(x, c, ws, None, config=cfg)
                        return out
                    try:
                        out = run()
                        torch.cuda.synchronize()
                        t = graph_ms(lambda cfg=cfg: run(cfg, copies)) / chain
                    except Exception as e:  # out of shared memory or registers: not a candidate
                        failed.append(f"{fmt(cfg)}: {type(e).__name__}")
                        continue
                    err = rel_error(out, truth)
                    results.append((t, cfg, err))
                results.sort(key=lambda r: r[0])
                print(f"\nweight_only[{kind}] M={M} N={N} K={Kd} ({name}): {len(results)} tilings, "
                      f"{len(failed)} did not run; floor {moved / copy_gbs / 1e6:.4f} ms at copy bandwidth")
                wrong = [r for r in results if not r[2] <= 2e-2]
                for t, cfg, err in results[:6] + [r for r in results[6:] if r[1] == default]:
                    tag = " (default)" if cfg == default else ""
                    gbs = moved / t / 1e6
                    print(f"  {fmt(cfg):<40} {t:8.4f} ms {gbs:6.0f} GB/s {100 * gbs / copy_gbs:4.0f}% "
                          f"err {err:.1e}{tag}")
                for t, cfg, err in wrong:
                    print(f"  WRONG {fmt(cfg)}: rel err {err:.2e}")
                if results:
                    best, dflt = results[0], next((r for r in results if r[1] == default), None)
                    summary.append(f"{kind:<4} M={M:<4} {name:<8} best {fmt(best[1]):<40} {best[0]:.4f} ms "
                                   f"{100 * moved / best[0] / 1e6 / copy_gbs:3.0f}%copy | default "
                                   + (f"{dflt[0]:.4f} ms" if dflt else "did not run") + f" | wrong {len(wrong)}"
                                   + (f" | cuBLAS {cublas:.4f} ms" if cublas is not None else ""))
    print("\nsweep summary (weight-only; %copy of the fewest bytes):")
    for line in summary:
        print(line)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--only", choices=["norm", "activation", "rotary", "attention", "quant"], default=None)
    parser.add_argument("--sweep", action="store_true", help="sweep the weight-only GEMM tilings instead")
    parser.add_argument("--sweep-m", default="1", help="comma-separated M values for --sweep (default 1)")
    parser.add_argument("--sweep-kinds", default="int8,fp8",
                        help="int8, fp8 (weight-only), bf16 (float weights in --dtype against cuBLAS's F.linear); "
                             "default int8,fp8")
    parser.add_argument("--sweep-chain", type=int, default=1,
                        help="time each tiling as N launches back to back over N weight copies (per launch)")
    parser.add_argument("--sweep-shapes", default=",".join(s[0] for s in LLAMA_1B_LINEARS),
                        help="which of the model's linears (default all: qkv,o,gate_up,down,lm_head)")
    parser.add_argument("--sweep-model", default="llama-1b", choices=sorted(SWEEP_MODELS),
                        help="whose linears --sweep times (llama-8b-tp2: one rank's of two)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py times Triton kernels on a CUDA device; none is available here.")
        return 1
    import triton

    from kiln.codegen import kernels as K
    from kiln.codegen import triton_ops

    device = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    props = torch.cuda.get_device_properties(device)
    print(f"device {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, "
          f"triton {triton.__version__}, dtype {args.dtype}")
    copy_gbs = copy_bandwidth(device)
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s (bytes read + written); '%copy' is against it\n")
    if args.sweep:
        sweep_weight_only(dtype, device, K, copy_gbs, [int(m) for m in args.sweep_m.split(",")],
                          args.sweep_kinds.split(","), args.sweep_shapes.split(","), args.sweep_chain,
                          SWEEP_MODELS[args.sweep_model])
        return 0
    table = Table(copy_gbs)
    sections = {"norm": bench_norms, "activation": bench_activations, "rotary": bench_rotary}
    for name, fn in sections.items():
        if args.only in (None, name):
            fn(table, dtype, device, K)
    if args.only in (None, "attention"):
        bench_attention(table, dtype, device, K, triton_ops)
    if args.only in (None, "quant"):
        bench_quant_rows(table, dtype, device, K)
        bench_quant_gemms(table, dtype, device, K)
    return 0


if __name__ == "__main__":
    sys.exit(main())
