"""Session 32 scratch: how fast can persistent programs stream weights through TMA on this GPU?

G programs each stream boxes pid, pid + G, ... of a [R, 32, 64] bf16 view (R rows of 2048) through
NB shared-memory slots, nothing computed. Printed against the copy and the engine's own gemv over
one large matrix (the lm_head's rate) in the same call.
"""
import statistics
import sys

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

sys.path.insert(0, "benchmarks")


@gluon.jit
def _stream_kernel(desc, out_ptr, NBOX, G: gl.constexpr, NB: gl.constexpr, BR: gl.constexpr, KC: gl.constexpr):
    pid = gl.program_id(0)
    ring = gl.allocate_shared_memory(gl.bfloat16, [NB, BR, 8, 64], desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [NB, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NB):
        mbarrier.init(bars.index(i), count=1)
    mine = (NBOX - pid + G - 1) // G
    for i in gl.static_range(NB - 1):
        if i < mine:
            b = pid + i * G
            mbarrier.expect(bars.index(i), BR * 1024)
            tma.async_copy_global_to_shared(desc, [(b // KC) * BR, (b % KC) * 8, 0], bars.index(i), ring.index(i))
    for j in range(mine):
        n = j + NB - 1
        if n < mine:
            s = n % NB
            b = pid + n * G
            mbarrier.expect(bars.index(s), BR * 1024)
            tma.async_copy_global_to_shared(desc, [(b // KC) * BR, (b % KC) * 8, 0], bars.index(s), ring.index(s))
        mbarrier.wait(bars.index(j % NB), (j // NB) & 1)
    for i in gl.static_range(NB):
        mbarrier.invalidate(bars.index(i))
    gl.store(out_ptr + pid, mine)


def stream(w, out, G, NB, BR):
    R, K = w.shape
    flat = w.view(R, K // 64, 64)
    layout = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=3)
    desc = TensorDescriptor(flat, list(flat.shape), list(flat.stride()), [BR, 8, 64], layout)
    kc = K // 512
    nbox = (R // BR) * kc
    return lambda: _stream_kernel[(G,)](desc, out, nbox, G=G, NB=NB, BR=BR, KC=kc, num_warps=1)


if __name__ == "__main__":
    from kernels import copy_bandwidth
    from qkv_gemv import graph_us
    from kiln.codegen.kernels.quant_gemm import float_linear
    dev = "cuda"
    nbytes = 1_946_157_056  # the 1B's 16 layers of q/k/v, o, gate/up, down
    R = nbytes // 4096
    R -= R % 256
    w = torch.randn(R, 2048, device=dev).to(torch.bfloat16)
    out = torch.zeros(1024, dtype=torch.int32, device=dev)
    lm = torch.randn(128256, 2048, device=dev).to(torch.bfloat16)
    x = torch.randn(1, 2048, device=dev).to(torch.bfloat16)
    cg = copy_bandwidth(dev)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name()} copy {cg:.0f} GB/s, {sms} SMs, stream {R * 4096 / 1e9:.3f} GB")
    runs = {"engine gemv, lm_head [128256, 2048]": (lambda: float_linear(x, lm), lm.numel() * 2)}
    for spec in sys.argv[1].split(","):
        g, nb, br = (int(v) for v in spec.split("x"))
        g = sms * g // 100 if g >= 100 else g  # (100 = one a multiprocessor, 200 two)
        runs[f"tma G={g} NB={nb} box={br}x512"] = (stream(w, out, g, nb, br), R * 4096)
    times = {k: [] for k in runs}
    for _ in range(3):
        for name, (fn, _) in runs.items():
            times[name].append(graph_us(fn, 1))
    for name, ts in times.items():
        us = statistics.median(ts)
        nb_ = runs[name][1]
        print(f"{name:>40} {us:9.1f} us {nb_ / us / 1e3:7.0f} GB/s {100 * nb_ / (us * 1e-6) / (cg * 1e9):6.1f}% of copy")
