import sys, torch
sys.path.insert(0, "scratch_gluon")
import gluon_chain as gc
L, H, I, NQKV = 16, 2048, 8192, 3072
torch.manual_seed(0)
dev = "cuda"
def st(n, k): return (torch.randn(L, n, k, device=dev) * k ** -0.5).to(torch.bfloat16)
ws = st(NQKV, H), st(H, H), st(2 * I, H), st(H, I)
x = torch.randn(H, device=dev).to(torch.bfloat16)
sync = sys.argv[1] == "1"
for _ in range(3):
    gc.gluon_chain(x, *ws, programs=128, bn=8, stages=16, num_warps=8, fence=False, xvec=8, sync=sync, max_spins=1 << 20)
torch.cuda.synchronize()
print("done")
