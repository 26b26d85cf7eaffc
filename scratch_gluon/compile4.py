"""Compile chain4 for sm_90 offline (no GPU): python compile4.py KBxNBxXxSYNC"""
import sys, os
sys.path.insert(0, os.path.dirname(__file__))
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
import gluon_chain4 as gc4
kb, nb, x, sync = (int(v) for v in sys.argv[1].split("x"))
lay = "NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=3, transposed=False, fp4_padded=False, cga_layout=[])"
desc = f"tensordesc<bf16[8, 8, 64],{lay}>"
sig = {"x_ptr": "*bf16", "buf_ptr": "*bf16", "ll_ptr": "*i32", "count_ptr": "*i32", "qkv_desc": desc, "o_desc": desc, "gu_desc": desc,
       "down_desc": desc, "L": "i32", "stamps_ptr": "*i64"}
const = {"H": 2048, "I": 8192, "NQKV": 3072, "G": 128, "KB": kb, "NB": nb, "X": x, "SYNC": sync, "GPIECE": 4096, "PIPE": 1}
sig.update({k: "constexpr" for k in const})
k = triton.compile(GluonASTSource(gc4._chain4_kernel, sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": 4})
print("compiled; shared", k.metadata.shared)
open("/tmp/chain4.ptx", "w").write(k.asm["ptx"])
