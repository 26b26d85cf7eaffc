import sys, torch
sys.path.insert(0, "scratch_gluon")
import gluon_chain3 as gc
L, H, I, NQKV = 16, 2048, 8192, 3072
torch.manual_seed(0)
def st(n, k): return (torch.randn(L, n, k, device="cuda") * k ** -0.5).to(torch.bfloat16)
ws = st(NQKV, H), st(H, H), st(2 * I, H), st(H, I)
x = torch.randn(H, device="cuda").to(torch.bfloat16)
kb, nb, warps, sync = (int(v) for v in sys.argv[1].split("x"))
G = 128
stamps = torch.zeros(4 * L * 2 * G, dtype=torch.int64, device="cuda")
for _ in range(5):
    gc.gluon_chain3(x, *ws, kb=kb, stages=nb, num_warps=warps, stamps=stamps, sync=sync)
torch.cuda.synchronize()
t = stamps.view(4 * L, 2, G).double().cpu() / 1000.0  # us
S, W = t[:, 0, :], t[:, 1, :]
rows = []
for s in range(4 * L - 1):
    sig, ex = S[s], W[s]
    skew = (sig.max() - sig.median()).item()
    release = (ex.min() - sig.max()).item()
    spread = (ex.max() - ex.min()).item()
    work = (S[s + 1] - W[s]) if s + 1 < 4 * L - 1 else None
    rows.append((s % 4, skew, release, spread, work.mean().item() if work is not None else float("nan"),
                 (work.max() - work.min()).item() if work is not None else float("nan")))
import statistics
for role in range(4):
    r = [x for x in rows if x[0] == role]
    med = lambda i: statistics.median(v[i] for v in r)
    print(f"after matrix role {role}: median over layers: slowest-vs-median signal {med(1):.2f} us, last signal -> first exit {med(2):.2f} us, exits spread {med(3):.2f} us, next matrix's work mean {med(4):.2f} us (spread {med(5):.2f})")
total = (S[4 * L - 2].max() - W[0].min()).item()
print(f"from the first wait's end to the last signal: {total:.1f} us")
