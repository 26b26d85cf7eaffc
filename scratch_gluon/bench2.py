import statistics, sys, torch
sys.path.insert(0, "scratch_gluon"); sys.path.insert(0, "benchmarks")
import gluon_chain2 as gc2
from kernels import copy_bandwidth
from qkv_gemv import graph_us
from kiln.codegen.kernels.quant_gemm import act_and_mul_gemv, float_linear
L, H, I, NQKV = 16, 2048, 8192, 3072
dev, dt = "cuda", torch.bfloat16
torch.manual_seed(0)
def st(n, k): return (torch.randn(L, n, k, device=dev) * k ** -0.5).to(dt)
ws = st(NQKV, H), st(H, H), st(2 * I, H), st(H, I)
x = torch.randn(H, device=dev).to(dt)
wb = sum(w.numel() * 2 for w in ws)
cg = copy_bandwidth(dev)
print(f"{torch.cuda.get_device_name()} copy {cg:.0f} GB/s floor {wb / cg / 1e3:.1f} us")
def ref(n):
    row = x.float()
    for l in range(n):
        qkv = (ws[0][l].float() @ row).to(dt).float(); o = (ws[1][l].float() @ qkv[:H]).to(dt).float()
        gu = (ws[2][l].float() @ o).to(dt).float(); act = (torch.nn.functional.silu(gu[:I]) * gu[I:]).to(dt).float()
        row = (ws[3][l].float() @ act).to(dt).float()
    return row
def engine(*w):
    row = x[None]
    for l in range(w[0].shape[0]):
        qkv = float_linear(row, w[0][l]); o = float_linear(qkv[:, :H], w[1][l]); gu = float_linear(o, w[2][l])
        row = act_and_mul_gemv(gu, "silu", w[3][l])
    return row[0]
runs = {"engine": engine}
for spec in sys.argv[1].split(","):
    kb, nb, warps, sync = (int(v) for v in spec.split("x"))
    cnt = torch.zeros(32 * 129, dtype=torch.int32, device=dev)
    runs[spec] = (lambda *w, kb=kb, nb=nb, warps=warps, sync=sync, cnt=cnt:
                  gc2.gluon_chain2(x, *w, kb=kb, stages=nb, num_warps=warps, counter=cnt, sync=sync))
times = {k: [] for k in runs}
for name, fn in list(runs.items()):
    try:
        errs = []
        for n in (2, 3):
            out = fn(*(w[:n] for w in ws)).float(); r = ref(n)
            errs.append(((out - r).norm() / r.norm()).item())
        torch.cuda.synchronize()
        print(name, "err", errs)
    except Exception as e:
        print(name, type(e).__name__, str(e)[:300]); del runs[name], times[name]
for _ in range(3):
    for name, fn in runs.items():
        times[name].append(graph_us(lambda: fn(*ws), 1))
base = statistics.median(times["engine"])
for name, ts in times.items():
    us = statistics.median(ts)
    print(f"{name:>14} {us:9.1f} us {100 * wb / (us * 1e-6) / (cg * 1e9):6.1f}% {base / us:6.3f}x  " + " ".join(f"{t:.1f}" for t in ts))
