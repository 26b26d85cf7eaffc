"""Compile kernels for an H100 (sm_90) with the installed Triton, no GPU needed: Triton's own
ptxas turns each variant into a cubin, so a variant the interpreter runs but the compiler rejects
(Triton 3.6 once refused an int32 branch written as early returns) fails here, on a CPU. Run by
test_compile_sm90.py in a subprocess (TRITON_INTERPRET=0: under the interpreter `triton.jit`
makes no compilable function); also by hand with another Triton, e.g. the GPU machines' 3.6:

    TRITON_INTERPRET=0 python tests/codegen/sm90_compile.py

Prints one line per variant and exits non-zero if any failed.
"""

from __future__ import annotations

import importlib
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kiln.codegen.kernels import quant_gemm

# (the package re-exports the launcher under the module's name)
decode_attention = importlib.import_module("kiln.codegen.kernels.decode_attention")

SM90 = GPUTarget("cuda", 90, 32)


def _compile(fn, sig: dict, consts: dict, num_warps: int, num_stages: int, maxnreg: int | None = None) -> str:
    """Compile fn for sm_90 with these argument types (sig, in argument order) and constexprs, and
    the kernel's own debug flag (and a register cap, as a launch may set one); its PTX."""
    names = list(sig)
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()})
    options = {"num_warps": num_warps, "num_stages": num_stages, "debug": bool(fn.debug),
               **({"maxnreg": maxnreg} if maxnreg else {})}
    kernel = triton.compile(src, target=SM90, options=options)
    assert kernel.asm["cubin"], "no cubin"
    return kernel.asm["ptx"]


_TL_TYPES = {"bf16": tl.bfloat16, "fp16": tl.float16}


def compile_gemv(x_ty: str, w_ty: str, prologue: int, early_w: bool, acc_int: bool = False,
                 fp8_bits: bool = False, round_to: str | None = None, rope: int = 0,
                 cache_ty: str | None = None, tile: tuple[int, int, int] = (8, 1024, 8), send: bool = False,
                 norm_at_end: bool = True, x_copies: int = 0, x_index: bool = False) -> None:
    """One `_gemv_kernel` variant: x and w element types as Triton spells them ("bf16", "i8",
    "fp8e4nv"), a prologue (quant_gemm's constants), the early weight load, fp8 read by its bits,
    a float32 output rounded to `round_to` first (the logits), a rope epilogue (`rope_epilogue`'s
    NEOX or GPTJ) into a cache of `cache_ty` (default: the output's type), the tile (rows, K step,
    warps), each program sending its values to the peer rank (`quant_gemm.reduced_gemv`), a norm prologue's
    statistics gathered in the product's loop (`quant_gemm.NORM_AT_END`, the default) or first, the row as
    float32 partial sums (x_copies > 0: `fused_mlp`'s output), the row gathered from a table by an index
    (x_index: an embedding's)."""
    block_n, block_k, num_warps = tile
    out_ty = "fp32" if round_to else "bf16" if x_ty == "i8" else x_ty
    sig = {"x_ptr": "*fp32" if x_copies else f"*{x_ty}", "w_ptr": f"*{w_ty}", "w_scale_ptr": "*fp32", "x_scale_ptr": "*fp32",
           "bias_ptr": f"*{out_ty}", "out_ptr": f"*{out_ty}", "part_ptr": "*fp32", "res_ptr": f"*{x_ty}",
           "g_ptr": f"*{x_ty}", "sum_ptr": f"*{x_ty}", "N": "i32", "K": "i32", "stride_wn": "i32",
           "k_per_split": "i32", "plane": "i32", "eps": "fp32"}
    sig.update({"pos_ptr": "*i64", "cs_ptr": "*fp32", "slot_ptr": "*i64", "kc_ptr": f"*{cache_ty or out_ty}",
                "vc_ptr": f"*{cache_ty or out_ty}"})
    sig.update(dict.fromkeys(("cs_stride", "kc_sb", "kc_ss", "kc_sh", "vc_sb", "vc_ss", "vc_sh", "block_size"), "i32"))
    sig.update({"k_scale": "fp32", "v_scale": "fp32", "QD": "i32", "KD": "i32", "DV": "i32"})
    sig.update({"peer_recv_addr": "i64", "epochs_ptr": "*i32", "slot_stride": "i32"})
    consts = dict(HAS_X_SCALE=acc_int, HAS_BIAS=True, ACC_INT=acc_int, W_INT8=w_ty == "i8", BLOCK_N=block_n, BLOCK_K=block_k,
                  SPLIT_K=1, EVEN_K=True, PDL=True, EARLY_W=early_w, PROLOGUE=prologue, K_CHUNKS=2,
                  FP8_BITS=fp8_bits, ROUND=_TL_TYPES[round_to] if round_to else None, ROPE=rope,
                  KV_FP8=cache_ty == "fp8e4nv", EXACT_ROUND=False, HEAD_D=64, SEND=bool(send),
                  PER_WORD=4 // (4 if out_ty == "fp32" else 2),
                  NORM_AT_END=norm_at_end and prologue in (quant_gemm.RMS_NORM, quant_gemm.ADD_RMS_NORM),
                  X_COPIES=x_copies, X_INDEX=x_index)
    if x_index:  # the residual's pointer carries the row's index
        sig["res_ptr"] = "*i64"
    sig.update(dict.fromkeys(consts, "constexpr"))
    at_end = consts["NORM_AT_END"]
    cap = quant_gemm._ROPE_AT_END_MAXNREG if at_end and rope and num_warps == 8 else None  # (as `_linear` caps it)
    ptx = _compile(quant_gemm._gemv_kernel, sig, consts, num_warps=num_warps, num_stages=3, maxnreg=cap)
    if send:  # each program's words: no fence, no count
        assert "st.global.v2.b64" in ptx or "st.global.b64" in ptx, "the words to the peer are lost"
        assert "acq_rel" not in ptx and "fence" not in ptx, "a program that sends its row waits for nothing"



def compile_gemv_tiles(w_ty: str, prologue: int, tiles: int, tile: tuple[int, int, int], depth: int = 1,
                       k_steps: int = 1, early_w: bool = True, fp8_bits: bool = False) -> None:
    """One `_gemv_tiles_kernel` variant (bf16 rows): the weight type, a prologue, the tiles a program
    and the tile (rows, K step, warps), the steps loaded ahead, the K steps a tile."""
    block_n, block_k, num_warps = tile
    consts = dict(HAS_BIAS=False, W_INT8=w_ty == "i8", FP8_BITS=fp8_bits, BLOCK_N=block_n, BLOCK_K=block_k,
                  K_STEPS=k_steps, TILES=tiles, DEPTH=depth, EVEN_K=True, PDL=True, EARLY_W=early_w, PROLOGUE=prologue,
                  ROUND=None)
    fn = quant_gemm._gemv_tiles_kernel
    pointers = {"w_ptr": w_ty, "w_scale_ptr": "fp32"}
    sig = {name: "constexpr" if name in consts else f"*{pointers.get(name, 'bf16')}" if name.endswith("_ptr")
           else "fp32" if name == "eps" else "i32" for name in fn.arg_names}
    ptx = _compile(fn, sig, consts, num_warps=num_warps, num_stages=1)
    if early_w:  # the first step's weights are asked for before the wait
        assert ptx.index("ld.global") < ptx.index("griddepcontrol.wait"), "no weight load before the wait"


def compile_fused_mlp(ty: str, block: int, ks: int, w_ty: str | None = None, early_w: bool = True) -> None:
    """One `fused_mlp._mlp_gemv_kernel` variant at its default tiling: the model dtype, the step along
    a row and the steps a row (the 1B's whole rows of 2048; the 8B's two steps of 2048), 8-bit
    weights ("i8", "fp8e4nv") or the model dtype's."""
    from kiln.codegen.kernels import fused_mlp

    consts = dict(R=fused_mlp.ROWS, BLOCK=block, KS=ks, TILES=fused_mlp.TILES, DEPTH=fused_mlp.DEPTH,
                  COPIES=2, ACT=0, W8={None: 0, "i8": 1, "fp8e4nv": 2}[w_ty], EARLY_W=early_w, PDL=True)
    fn = fused_mlp._mlp_gemv_kernel
    pointers = {"acc_ptr": "fp32", "zero_ptr": "fp32", "gus_ptr": "fp32", "ds_ptr": "fp32",
                "wgu_ptr": w_ty or ty, "wdt_ptr": w_ty or ty}
    sig = {name: "constexpr" if name in consts else f"*{pointers.get(name, ty)}" if name.endswith("_ptr")
           else "fp32" if name == "eps" else "i32" for name in fn.arg_names}
    ptx = _compile(fn, sig, consts, num_warps=fused_mlp.NUM_WARPS, num_stages=1)
    assert "atom.global" in ptx or "red.global" in ptx, "the partial sums' atomics are lost"
    if early_w:
        assert ptx.index("ld.global") < ptx.index("griddepcontrol.wait"), "no weight load before the wait"


_DECODE_POINTERS = {"k_cache_ptr": "cache", "v_cache_ptr": "cache", "tables_ptr": "i64", "seq_lens_ptr": "i32",
                    "sinks_ptr": "fp32", "alibi_ptr": "fp32", "part_acc_ptr": "fp32", "part_ml_ptr": "fp32",
                    "counter_ptr": "i32"}


def compile_decode(cache_ty: str, num_splits: int, early_kv: bool = False, newest_row: bool = False) -> None:
    """One `_decode_kernel` variant (Llama-3.2-1B heads: 32 over 8 kv heads of 64): the cache's
    element type, the splits (merged in the kernel), the first tile loaded before the wait, this
    step's token read as a row or as a masked tile (`NEWEST_ROW`)."""
    fn = decode_attention._decode_kernel
    consts = dict(NUM_SPLITS=num_splits, MERGE_HERE=num_splits > 1, HAS_WINDOW=False,
                  HAS_SOFT_CAP=False, HAS_SINKS=False, HAS_ALIBI=False, KV_FP8=cache_ty == "fp8e4nv", PRECISION="tf32",
                  UPCAST=False, EARLY_KV=early_kv, NEWEST_ROW=newest_row, BLOCK_G=16, BLOCK_N=128,
                  BLOCK_D=64, BLOCK_DV=64, PDL=True)
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            ty = _DECODE_POINTERS.get(name, "bf16")
            sig[name] = "*" + (cache_ty if ty == "cache" else ty)
        else:
            sig[name] = "fp32" if name in ("scale", "soft_cap", "v_scale") else "i32"
    _compile(fn, sig, consts, num_warps=4, num_stages=2)


def compile_two_rank_all_reduce(ty: str) -> None:
    """The two-rank all-reduce kernel for an activation type: its system-scope flags included."""
    from kiln.codegen.kernels import two_rank_all_reduce as m

    fn = m._two_rank_all_reduce_kernel
    consts = dict(BLOCK=m.BLOCK, PDL=True)
    pointers = {"x_ptr": ty, "out_ptr": ty, "epochs_ptr": "i32"}  # (the shared buffers come as addresses)
    sig = {name: "constexpr" if name in consts else f"*{pointers[name]}" if name in pointers
           else "i64" if name.endswith("_addr") else "i32" for name in fn.arg_names}
    ptx = _compile(fn, sig, consts, num_warps=4, num_stages=1)
    assert "__assertfail" in ptx, "the wait's device_assert was compiled out"
    assert "atom.global.sys.release.exch" in ptx and "ld.global.sys.acquire" in ptx, "the flags lost their ordering"


def compile_two_rank_ll(ty: str, send: bool = True) -> None:
    """The "ll" protocol's kernel (send=False: its receive-only form): its polls must stay volatile
    loads (re-read every time)."""
    from kiln.codegen.kernels import two_rank_all_reduce as m

    fn = m._two_rank_ll_kernel
    consts = dict(BLOCK=m.BLOCK, PER_WORD=2 if ty == "bf16" else 1, PDL=True, SEND=send)
    pointers = {"x_ptr": ty, "out_ptr": ty, "epochs_ptr": "i32"}
    sig = {name: "constexpr" if name in consts else f"*{pointers[name]}" if name in pointers
           else "i64" if name.endswith("_addr") else "i32" for name in fn.arg_names}
    ptx = _compile(fn, sig, consts, num_warps=4, num_stages=1)
    assert "__assertfail" in ptx, "the wait's device_assert was compiled out"
    assert "ld.volatile.global" in ptx, "the polls are not volatile loads"


def compile_decode_inputs() -> None:
    """A decode graph's first kernel (its loop over the table row runs to a width it loads), and
    its PDL calls in the protocol's order: the wait, then the successor's launch."""
    from kiln.codegen.kernels import decode_inputs as m

    fn = m._unpack_kernel
    consts = dict(BLOCK=m._BLOCK, PDL=True)
    pointers = {"seq_lens_ptr": "i32"}
    sig = {name: "constexpr" if name in consts else f"*{pointers.get(name, 'i64')}" if name.endswith("_ptr")
           else "i32" for name in fn.arg_names}
    ptx = _compile(fn, sig, consts, num_warps=1, num_stages=1)
    assert ptx.index("griddepcontrol.wait") < ptx.index("griddepcontrol.launch_dependents"), \
        "the successor may launch before this kernel's wait"


def compile_argmax(out_row: bool) -> None:
    """The argmax's second launch (out_row: into the row of its output that a device scalar names,
    as the decode graphs' does), its PDL calls in the protocol's order."""
    from kiln.codegen.kernels import sampling as m

    fn = m._chunks_argmax_kernel
    consts = dict(BLOCK=64, OUT_ROW=out_row, PDL=True)
    sig = {"val_ptr": "*fp32", "idx_ptr": "*i32", "out_ptr": "*i64", "out_row_ptr": "*i64", "out_stride": "i32",
           "num_chunks": "i32", "V": "i32", **dict.fromkeys(consts, "constexpr")}
    ptx = _compile(fn, sig, consts, num_warps=4, num_stages=1)
    assert ptx.index("griddepcontrol.wait") < ptx.index("griddepcontrol.launch_dependents"), \
        "the successor may launch before this kernel's wait"


def variants() -> list[tuple]:
    out = [(x, x, p, early) for x in ("bf16", "fp16") for p in range(6) for early in (False, True)]
    out += [("bf16", w, p, True) for w in ("i8", "fp8e4nv") for p in range(6)]
    out += [("i8", "i8", quant_gemm.NO_PROLOGUE, True, True)]  # W8A8 int8: int32 accumulation
    out += [("bf16", "fp8e4nv", p, True, False, True) for p in range(6)]  # quant_gemm.FP8_BY_BITS
    out += [(x, x, quant_gemm.NO_PROLOGUE, True, False, False, x) for x in ("bf16", "fp16")]  # the logits
    # the q/k/v gemv with its rotary epilogue: float and 8-bit weights, both norms, an fp8 cache
    out += [("bf16", w, p, True, False, False, None, rope, cache) for w in ("bf16", "i8")
            for p in (quant_gemm.RMS_NORM, quant_gemm.ADD_RMS_NORM) for rope in (quant_gemm.NEOX, quant_gemm.GPTJ)
            for cache in (None, "fp8e4nv")]
    # the "deep" tile (Llama-3.1-8B's 16-bit matrices): o, down with SwiGLU, gate_up with its norm, q/k/v with rotary
    out += [("bf16", "bf16", p, True, False, False, None, rope, None, (4, 2048, 8))
            for p, rope in ((quant_gemm.NO_PROLOGUE, 0), (quant_gemm.SILU_AND_MUL, 0),
                            (quant_gemm.ADD_RMS_NORM, 0), (quant_gemm.ADD_RMS_NORM, quant_gemm.NEOX))]
    # the row-parallel gemv whose programs send their values to the peer rank (quant_gemm.reduced_gemv): o, down
    # with SwiGLU (the 1B and the deep tiles), 8-bit weights
    out += [("bf16", w, p, True, False, False, None, 0, None, tile, True)
            for w, p, tile in (("bf16", quant_gemm.NO_PROLOGUE, (8, 2048, 8)), ("bf16", quant_gemm.SILU_AND_MUL, (4, 2048, 8)),
                               ("i8", quant_gemm.SILU_AND_MUL, (4, 2048, 8)))]
    # the norm prologues with their statistics in a pass of their own (quant_gemm.NORM_AT_END off): the 1B's
    # q/k/v with rotary, the deep tile's gate_up and q/k/v
    out += [("bf16", "bf16", quant_gemm.ADD_RMS_NORM, True, False, False, None, rope, None, tile, 0, False)
            for rope, tile in ((quant_gemm.NEOX, (8, 1024, 8)), (0, (4, 2048, 8)), (quant_gemm.NEOX, (4, 2048, 8)))]
    # the row as fused_mlp's float32 partial sums: the q/k/v gemv with rotary (both norm placements), gate_up
    out += [("bf16", "bf16", quant_gemm.ADD_RMS_NORM, True, False, False, None, rope, None, tile, 0, at_end, 4)
            for rope, tile, at_end in ((quant_gemm.NEOX, (8, 1024, 8), True), (quant_gemm.NEOX, (8, 1024, 8), False),
                                       (0, (4, 1024, 4), True))]
    # the row gathered from the embedding table: the first layer's q/k/v gemv with rotary (both norm placements,
    # float and 8-bit weights), a gate_up-like one without
    out += [("bf16", w, quant_gemm.RMS_NORM, True, False, False, None, rope, None, tile, 0, at_end, 0, True)
            for w, rope, tile, at_end in (("bf16", quant_gemm.NEOX, (8, 1024, 8), True),
                                          ("bf16", quant_gemm.NEOX, (8, 1024, 8), False),
                                          ("i8", quant_gemm.NEOX, (8, 1024, 8), True), ("bf16", 0, (4, 1024, 4), True))]
    # several tiles a program (quant_gemm._gemv_tiles_kernel): every prologue, float and 8-bit weights, whole
    # rows and rows in steps, two steps ahead
    out += [("gemv_tiles", w, p, 4, (4, 2048, 8)) for w in ("bf16", "i8", "fp8e4nv") for p in range(6)]
    out += [("gemv_tiles", "bf16", quant_gemm.SILU_AND_MUL, 2, (2, 4096, 8), 1, 2),
            ("gemv_tiles", "bf16", quant_gemm.ADD_RMS_NORM, 2, (4, 1024, 4), 2, 2),
            ("gemv_tiles", "fp8e4nv", quant_gemm.NO_PROLOGUE, 2, (4, 2048, 4), 2, 1, True, True),
            ("gemv_tiles", "bf16", quant_gemm.NO_PROLOGUE, 2, (2, 2048, 4), 1, 1, False)]
    out += [("fused_mlp", ty, block, ks) for ty in ("bf16", "fp16") for block, ks in ((2048, 1), (2048, 2), (64, 1))]
    out += [("fused_mlp", "bf16", block, ks, w) for w in ("i8", "fp8e4nv") for block, ks in ((2048, 1), (2048, 2))]
    out += [("decode", c, splits, early) for c in ("bf16", "fp8e4nv") for splits in (1, 16) for early in (False, True)]
    out += [("decode", c, 16, True, True) for c in ("bf16", "fp8e4nv")]  # decode_attention.NEWEST_ROW on
    out += [("two_rank_all_reduce", ty) for ty in ("bf16", "fp32")]
    out += [("two_rank_ll", ty, send) for ty in ("bf16", "fp32") for send in (True, False)]
    out += [("decode_inputs",), ("argmax", False), ("argmax", True)]
    return out


def main() -> int:
    failed = 0
    for case in variants():
        try:
            if case[0] == "decode":
                compile_decode(*case[1:])
            elif case[0] == "two_rank_all_reduce":
                compile_two_rank_all_reduce(*case[1:])
            elif case[0] == "two_rank_ll":
                compile_two_rank_ll(*case[1:])
            elif case[0] == "decode_inputs":
                compile_decode_inputs()
            elif case[0] == "argmax":
                compile_argmax(*case[1:])
            elif case[0] == "fused_mlp":
                compile_fused_mlp(*case[1:])
            elif case[0] == "gemv_tiles":
                compile_gemv_tiles(*case[1:])
            else:
                compile_gemv(*case)
            print("ok", case)
        except Exception as e:  # noqa: BLE001 (report every variant, then fail)
            failed += 1
            print("FAILED", case, f"{type(e).__name__}: {str(e)[:500]}")
    print(f"triton {triton.__version__}: {len(variants()) - failed} of {len(variants())} compiled for sm_90")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
