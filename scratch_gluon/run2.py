import sys, torch
sys.path.insert(0, "scratch_gluon")
import gluon_chain2 as gc
L, H, I, NQKV = 16, 2048, 8192, 3072
torch.manual_seed(0)
def st(n, k): return (torch.randn(L, n, k, device="cuda") * k ** -0.5).to(torch.bfloat16)
ws = st(NQKV, H), st(H, H), st(2 * I, H), st(H, I)
x = torch.randn(H, device="cuda").to(torch.bfloat16)
for _ in range(2):
    gc.gluon_chain2(x, *ws, kb=int(sys.argv[1]), stages=int(sys.argv[2]), num_warps=int(sys.argv[3]), sync=sys.argv[4] == '1')
torch.cuda.synchronize()
print("done")
