"""Compile chain3 for sm_90 offline (no GPU): python compile3.py KBxNBxWARPSxSYNC"""
import sys, os, subprocess, tempfile
sys.path.insert(0, os.path.dirname(__file__))
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
import gluon_chain3 as gc3
kb, nb, warps, sync = (int(v) for v in sys.argv[1].split("x"))
lay = "NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=3, transposed=False, fp4_padded=False, cga_layout=[])"
desc = f"tensordesc<bf16[8, 8, 64],{lay}>"
sig = {"x_ptr": "*bf16", "buf_ptr": "*bf16", "count_ptr": "*i32", "qkv_desc": desc, "o_desc": desc, "gu_desc": desc,
       "down_desc": desc, "L": "i32", "stamps_ptr": "*i64",
       "H": "constexpr", "I": "constexpr", "NQKV": "constexpr", "G": "constexpr", "KB": "constexpr", "NB": "constexpr",
       "SYNC": "constexpr", "GPIECE": "constexpr"}
const = {"H": 2048, "I": 8192, "NQKV": 3072, "G": 128, "KB": kb, "NB": nb, "SYNC": sync, "GPIECE": int(sys.argv[2]) if len(sys.argv) > 2 else 4096}
src = GluonASTSource(gc3._chain3_kernel, sig,
                     constexprs=const)
k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
print("compiled; shared", k.metadata.shared, "regs?", getattr(k, "n_regs", None))
ptx = k.asm["ptx"]
open("/tmp/chain3.ptx", "w").write(ptx)
print("wgmma", ptx.count("wgmma.mma_async"), "cp.async.bulk.tensor", ptx.count("cp.async.bulk.tensor"))
