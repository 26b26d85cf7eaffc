#!/usr/bin/env bash
# The GPU checks and timings the open issues need, section by section, in one call on a lent GPU:
# each section's full output goes to $OUT/<section>.txt and its summary lines to stdout.
#
#   bash benchmarks/gpu_session.sh [SECTION ...]     (default: kernels paths decode)
#
# Sections:
#   kernels     the Triton kernel tests compiled on the GPU (TRITON_INTERPRET=0)
#   paths       check_decode_paths.py: compiled == eager, gemv vs cuBLAS, async == steps in turn
#   decode      batch-1 decode (Llama-3.2-1B shape; async scheduling, the default on CUDA, and a row with
#               the steps in turn), with the A/B rows of two switches: rotary in the q/k/v gemv (on:
#               won in session 20), fp8 read by its bits (off: lost in session 20); three interleaved rounds
#   inputs      the decode graphs' input kernel's tests compiled on the GPU, then batch-1 decode with the staged step
#               unpacked by five copies instead (unpack_in_graph=0), the tokens read back on the main stream
#               (readback_stream=0), and both (the step boundary before session 25); five interleaved rounds
#   early-kv    batch-1 decode with the attention's older keys and values loaded before its PDL wait and after
#   norm        the norm gemvs' kernel tests compiled on the GPU (both ways of normalizing), then batch-1 decode with
#               the norm's statistics gathered in the gemv's product loop (the default) and read first
#   kv-tile     the decode attention's tests compiled on the GPU, then batch-1 decode with its key tile at 64 and 32,
#               and with this step's token read as a masked tile (NEWEST_ROW=0); five interleaved rounds (--rounds 5), medians
#   quant       batch-1 decode of the 8-bit weight-only rows (issue 9), three interleaved rounds
#   tiles       batch-1 decode with other o/down gemv tilings (codegen/NOTES.md, session 19)
#   token-buffers  one token buffer for the decode graphs' argmax against two (cuda_graphs.TOKEN_BUFFERS, 2 since
#               session 28): the argmax's tests compiled on the GPU, the decode paths with one, then batch-1 decode
#               with one against the default, five interleaved rounds
#   prologue    benchmarks/gemv_prologue.py: gate/up and q/k/v gemvs bare, with the norm prologue and with the
#               residual add in it, as chains
#   wide-tiles  batch-1 decode with other gate/up ("wide") gemv tilings: more rows a program, fewer reads of the row and
#               residual by its norm prologue (codegen/NOTES.md, session 27); five interleaved rounds
#   gemv-tiles  several tiles a gemv program (quant_gemm._gemv_tiles_kernel, session 29): its kernel tests compiled
#               on the GPU, then batch-1 decode in bf16, int8 and fp8 weight-only, each with today's tiles and with
#               gate/up, down (and bf16's o) on tiles streamed several a program; three interleaved rounds
#   qkv         benchmarks/qkv_gemv.py: the q/k/v gemv (norm prologue, rotary epilogue) over its tilings, on the 1B
#               shape and a TP=2 rank of 8B
#   tp2tiles    the gemv tilings swept on one tensor-parallel rank's shapes of Llama-3.1-8B (one GPU)
#   profile     profile_decode.py: the 1B batch-1 step kernel by kernel (device gaps, the idle time between steps) and
#               the host's phases
#   throughput  1000 requests against HF generate (issue 8)
#   host        profile_decode.py --host-only: the host's turn of a batch-1 step by phase (bf16, int8)
#   coldstart   cold_start.py --bytecode-cache: a fresh process to its first token, without and with the compile cache,
#               then the same two with a Python bytecode cache (the lent machines set PYTHONDONTWRITEBYTECODE and
#               ship no .pyc: without one, every start compiles ~4500 modules, about 11 s)
#   tp-check    check_tensor_parallel.py --compiled: TP=2's tokens against TP=1's with graphs, float32 (2 GPUs;
#               the all-reduces through kiln's two-rank kernel, the default at two ranks; both its protocols. The
#               sending gemv's check is tp-send's: float32 rows take cuBLAS, not the gemv, so only bf16 runs
#               reach it, and those are compared with the unfused TP=2 run, whose bits they must give)
#   tp          scale_out.py --skip-dp --nccl-all-reduce (2 GPUs: TP=2 against TP=1, and TP=2 over NCCL's all-reduce)
#   tp-send     scale_out.py --skip-dp --unfused-all-reduce: TP=1, TP=2 (each row-parallel gemv program sending its
#               values to the peer, a receive-only all-reduce after it: the default), TP=2 with the gemv, then the
#               all-reduce kernel
#   tp-norm     scale_out.py --skip-dp --compare-norm-at-end: TP=1, TP=2, TP=2 with the norm's statistics read first
#   tp-tiles    scale_out.py --skip-dp --compare-tiles: TP=1, TP=2, TP=2 with the q/k/v gemv's tile of qkv_gemv.py
#   tp-kv-tile  scale_out.py --skip-dp --compare-env "KILN_DECODE_BLOCK_N=32;KILN_NEWEST_ROW=1" --rounds 2: TP=2 with the
#               attention's key tile at 32 (64 spills at head dim 128), and with this step's token read as one
#               row, each configuration twice, interleaved
#   tp-rounds   scale_out.py --skip-dp --rounds 3: TP=1 and TP=2, three times, interleaved (the speedup read through
#               the run-to-run spread; TP_ROUNDS_ENV="A=0,B=0;C=1" adds a TP=2 run per set of environment switches,
#               TP_ROUNDS=2 fewer rounds: each run is about 45 s, and a call has 590)
#   tp-bound    tp-rounds with TP_ROUNDS=2 and TP=2 without any all-reduce (KILN_TIMING_SKIP_ALL_REDUCE=1, timing
#               only: wrong sums): what the exchanges cost the step, the most any all-reduce work could gain
#   tp-bisect   scale_out.py --skip-dp --compare-env "KILN_UNPACK_IN_GRAPH=0;KILN_DECODE_MAX_SPLITS=32" (TP_BISECT=...): TP=1,
#               TP=2, and TP=2 with each set of switches, every run's greedy tokens against TP=1's
#   tp-flags    scale_out.py --skip-dp --flags-all-reduce: TP=1, TP=2, TP=2 with the two-rank kernel's "flags" protocol
#   tp-nccl-ll  TP=2 over NCCL's all-reduce with NCCL_PROTO=LL (its low-latency protocol)
#   mlp         the one-launch MLP (fuse_mlp, session 33): its kernel tests compiled on the GPU, the MLP chains
#               (benchmarks/mlp_chain.py), then batch-1 decode with it and without it, five interleaved rounds
#   mlp-8bit    the one-launch MLP for 8-bit weight-only weights (fused_mlp.EIGHT_BIT, prepared in session 33,
#               off: it lost in sessions 34 and 35): its kernel tests on the GPU, then batch-1 decode in int8 and
#               fp8 weight-only, each with and without it at its best tiling of session 35 (4 rows x 2 tiles,
#               4 warps), three interleaved rounds
#   verdict     issue 8's step and cold start in one call (H100): batch-1 decode alone, ten interleaved rounds
#               (`decode_latency.py --rounds 10`), then the cold start's four starts given 320 s (session 35: 270 s
#               on a freshly started machine); the 1000-request run is `throughput`, a call of its own
#   fusions     the launches folded into their neighbours in session 34: the kernel tests of the one-launch MLP,
#               the norm gemvs (the embedding's row gathered) and the norm (partial sums read) on the GPU, then
#               batch-1 decode with everything, without fuse_embedding and with the last MLP apart
#               (fuse_mlp.FINAL_NORM off), ten interleaved rounds
#   pdl         the PDL chain, attention and fp8-cache kernel tests compiled on the GPU (the early kv loads)
#   allreduce   benchmarks/all_reduce.py: the all-reduce alone, chained in a CUDA graph (2 GPUs)
#   tp-profile  profile_decode.py --llama-8b --tensor-parallel-size 2: rank 0's kernels in a TP=2 step (2 GPUs)
# The repository root is the package `kiln`: it is linked under /tmp/kiln-path for imports.
# A lent GPU runs one command for at most 600 s: split the sections over calls, e.g.
#   `kernels paths` | `decode` | `quant host` | `throughput coldstart` | (2 GPUs) `tp-check allreduce` | `tp` | `tp-profile`
set -u
OUT=${OUT:-/tmp/kiln-gpu}
mkdir -p "$OUT" /tmp/kiln-path
ln -sfn "$PWD" /tmp/kiln-path/kiln
export PYTHONPATH=/tmp/kiln-path PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
# the 8B sections share one random checkpoint (16 GB, a minute to write) within a call
CKPT_8B="--checkpoint /tmp/kiln-8b"
LLAMA_1B_WORKLOAD="--num-prompts 1000 --min-input 128 --max-input 1024 --min-output 128 --max-output 128
  --hidden-size 2048 --num-layers 16 --num-heads 32 --num-kv-heads 8 --intermediate-size 8192 --vocab-size 128256
  --hf-batch-size 64 --repeats 1"

run() {  # run NAME SECONDS COMMAND...: the command's output to $OUT/NAME.txt, its exit status to stdout
    local name=$1 limit=$2
    shift 2
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    echo "== $name: exit $?"
}

gpu_tests() {  # gpu_tests NAME SECONDS PYTEST_ARGS...: kiln's kernel tests compiled on the GPU, their last lines shown
    local name=$1 limit=$2
    shift 2
    TRITON_INTERPRET=0 run "$name" "$limit" python -m pytest -q -p no:cacheprovider -W ignore "$@"
    tail -3 "$OUT/$name.txt" | cut -c1-300
}

section() {
    case $1 in
        kernels)
            gpu_tests kernels 300 tests/codegen/test_rope_gemv.py tests/codegen/test_quant_kernels.py \
                tests/codegen/test_rotary.py tests/codegen/test_attention.py tests/codegen/test_decode_inputs.py ;;
        paths)
            run paths 300 python benchmarks/check_decode_paths.py
            grep -E "==|Error" "$OUT/paths.txt" ;;
        decode)
            run decode 500 python benchmarks/decode_latency.py --no-hf --sync-scheduling --repeats 3 --rounds 3 \
                --compare-rope-fusion --quantization fp8_weight_only --compare-fp8-conversion
            grep -A18 "^device" "$OUT/decode.txt" ;;
        mlp)
            gpu_tests mlp-kernels 200 tests/codegen/test_fused_mlp.py
            (cd benchmarks && timeout 200 python mlp_chain.py) > "$OUT/mlp_chain.txt" 2>&1
            tail -8 "$OUT/mlp_chain.txt"
            run mlp 400 python benchmarks/decode_latency.py --no-hf --repeats 3 --rounds 5 --compare-mlp-fusion
            grep -A12 "^device" "$OUT/mlp.txt" ;;
        verdict)
            run verdict-decode 250 python benchmarks/decode_latency.py --no-hf --repeats 3 --rounds 10
            grep -A6 "^device" "$OUT/verdict-decode.txt"
            run verdict-coldstart 320 python benchmarks/cold_start.py --bytecode-cache
            tail -6 "$OUT/verdict-coldstart.txt" ;;
        fusions)
            gpu_tests fusion-kernels 200 tests/codegen/test_fused_mlp.py tests/codegen/test_rope_gemv.py \
                tests/codegen/test_norm.py
            run fusions 450 python benchmarks/decode_latency.py --no-hf --repeats 3 --rounds 10 \
                --compare-embedding-fusion --compare-switches "mlp_final_norm=0"
            grep -A10 "^device" "$OUT/fusions.txt" ;;
        mlp-8bit)
            gpu_tests mlp-kernels 200 tests/codegen/test_fused_mlp.py
            run mlp8 450 python benchmarks/decode_latency.py --no-hf --repeats 3 --rounds 3 \
                --quantization int8_weight_only,fp8_weight_only --compare-switches \
                "int8_weight_only@mlp_8bit=1,mlp_warps=4,mlp_rows=4;fp8_weight_only@mlp_8bit=1,mlp_warps=4,mlp_rows=4"
            grep -A16 "^device" "$OUT/mlp8.txt" ;;
        quant)
            run quant 400 python benchmarks/decode_latency.py --no-hf --repeats 3 --rounds 3 \
                --quantization int8_weight_only,fp8_weight_only
            grep -A14 "^device" "$OUT/quant.txt" ;;
        norm)
            gpu_tests norm-kernels 200 tests/codegen/test_rope_gemv.py tests/codegen/test_quant_kernels.py -k "norm or rope"
            run norm 400 python benchmarks/decode_latency.py --no-hf --repeats 3 --compare-norm-at-end --bracket
            grep -A6 "^device" "$OUT/norm.txt" ;;
        kv-tile)
            gpu_tests kv-tile-kernels 200 tests/codegen/test_attention.py -k "decode"
            run kv-tile 500 python benchmarks/decode_latency.py --no-hf --repeats 3 --rounds 5 \
                --compare-switches "decode_block_n=64;decode_block_n=32;newest_row=0"
            grep -A16 "^device" "$OUT/kv-tile.txt" ;;
        inputs)
            gpu_tests inputs-kernels 200 tests/codegen/test_decode_inputs.py
            run inputs 500 python benchmarks/decode_latency.py --no-hf --repeats 3 --rounds 5 \
                --compare-switches "unpack_in_graph=0;readback_stream=0;unpack_in_graph=0,readback_stream=0"
            grep -A16 "^device" "$OUT/inputs.txt" ;;
        early-kv)
            run early-kv 300 python benchmarks/decode_latency.py --no-hf --repeats 3 --compare-early-kv
            grep -A6 "^device" "$OUT/early-kv.txt" ;;
        qkv)
            run qkv-1b 240 python benchmarks/qkv_gemv.py --model llama-1b
            run qkv-8b-tp2 240 python benchmarks/qkv_gemv.py --model llama-8b-tp2
            grep -h -A4 "^summary\|^rope_gemv" "$OUT/qkv-1b.txt" "$OUT/qkv-8b-tp2.txt" | cut -c1-160 ;;
        tiles)
            run tiles 500 python benchmarks/decode_latency.py --no-hf --repeats 3 \
                --compare-gemv-tiles "small=8x1024x8,long=8x1024x8;small=4x2048x8,long=4x2048x8;small=16x1024x8,long=16x1024x8"
            grep -A12 "^device" "$OUT/tiles.txt" ;;
        token-buffers)
            gpu_tests token-kernels 200 tests/codegen/test_sampling.py tests/codegen/test_decode_inputs.py
            KILN_TOKEN_BUFFERS=1 run token-paths 300 python benchmarks/check_decode_paths.py
            grep -E "==|Error" "$OUT/token-paths.txt"
            run token-buffers 400 python benchmarks/decode_latency.py --no-hf --repeats 3 --rounds 5 \
                --compare-switches "token_buffers=1"
            grep -A9 "^device" "$OUT/token-buffers.txt" ;;
        prologue)
            run prologue 200 python benchmarks/gemv_prologue.py --tiles 8x1024x4,4x2048x8
            run prologue-qkv 200 python benchmarks/gemv_prologue.py --matrix qkv --tiles 4x1024x4
            cat "$OUT/prologue.txt" "$OUT/prologue-qkv.txt" ;;
        gemv-tiles)
            gpu_tests gemv-tiles-kernels 150 tests/codegen/test_quant_kernels.py \
                -k "tiles or 1-37-100-config3 or 1-40-512-config4 or 33-96-config3 or 40-200-config4"
            run gemv-tiles 430 python benchmarks/decode_latency.py --no-hf --repeats 3 --rounds 3 \
                --quantization int8_weight_only,fp8_weight_only --compare-gemv-tiles \
                "${GEMV_TILES_ROWS:-wide=4x2048x8x4x2,long=2x8192x8x2,small=2x2048x4x2;int8_weight_only@8bit.wide=2x2048x4x4,8bit.long=4x8192x8x2;fp8_weight_only@8bit.wide=2x2048x4x4,8bit.long=4x8192x8x2}"
            grep -A16 "^device" "$OUT/gemv-tiles.txt" ;;
        wide-tiles)
            run wide-tiles 500 python benchmarks/decode_latency.py --no-hf --repeats 3 --rounds 5 \
                --compare-gemv-tiles "wide=8x1024x4;wide=8x1024x8;wide=8x2048x8"
            grep -A12 "^device" "$OUT/wide-tiles.txt" ;;
        tp2tiles)
            run tp2tiles 500 python benchmarks/kernels.py --sweep --sweep-kinds bf16 --sweep-chain 8 \
                --sweep-model llama-8b-tp2
            sed -n '/sweep summary/,$p' "$OUT/tp2tiles.txt" ;;
        profile)
            run profile 300 python benchmarks/profile_decode.py
            grep -B2 -A40 "steps of" "$OUT/profile.txt" | cut -c1-170
            grep -A16 "host phases" "$OUT/profile.txt" | tail -17 ;;
        throughput)
            # shellcheck disable=SC2086
            run throughput 500 python benchmarks/throughput.py $LLAMA_1B_WORKLOAD
            grep -iE "kiln|ratio|HF|limit|device" "$OUT/throughput.txt" | tail -8 ;;
        host)
            run host 300 python benchmarks/profile_decode.py --host-only
            run host_int8 300 python benchmarks/profile_decode.py --host-only \
                --quantization int8_weight_only
            grep -A16 "host phases" "$OUT/host.txt" | tail -17
            grep -A16 "host phases" "$OUT/host_int8.txt" | tail -17 ;;
        coldstart)
            run coldstart 560 python benchmarks/cold_start.py --bytecode-cache
            tail -8 "$OUT/coldstart.txt" ;;
        tp-check)  # (the decode graphs gather the logits inside since session 19)
            KILN_TWO_RANK_PROTOCOL=flags run tp-check 300 python benchmarks/check_tensor_parallel.py --compiled \
                --dtype float32 --hidden-size 1024 --num-layers 4
            tail -4 "$OUT/tp-check.txt"
            KILN_TWO_RANK_PROTOCOL=ll run tp-check-ll 300 python benchmarks/check_tensor_parallel.py --compiled \
                --dtype float32 --hidden-size 1024 --num-layers 4
            tail -4 "$OUT/tp-check-ll.txt" ;;
        pdl)
            gpu_tests pdl 300 tests/codegen/test_pdl.py tests/codegen/test_attention.py tests/codegen/test_kv_cache_fp8.py ;;
        tp)
            run tp 580 python benchmarks/scale_out.py --skip-dp --nccl-all-reduce $CKPT_8B
            tail -9 "$OUT/tp.txt" ;;
        tp-send)
            run tp-send 590 python benchmarks/scale_out.py --skip-dp --unfused-all-reduce $CKPT_8B
            tail -9 "$OUT/tp-send.txt" ;;
        tp-norm)
            run tp-norm 590 python benchmarks/scale_out.py --skip-dp --compare-norm-at-end $CKPT_8B
            tail -9 "$OUT/tp-norm.txt" ;;
        tp-tiles)
            run tp-tiles 590 python benchmarks/scale_out.py --skip-dp --compare-tiles "deep+rope=8x1024x8" $CKPT_8B
            tail -9 "$OUT/tp-tiles.txt" ;;
        tp-kv-tile)
            run tp-kv-tile 590 python benchmarks/scale_out.py --skip-dp --rounds 2 \
                --compare-env "KILN_DECODE_BLOCK_N=32;KILN_NEWEST_ROW=1" $CKPT_8B
            tail -12 "$OUT/tp-kv-tile.txt" ;;
        tp-rounds)
            # shellcheck disable=SC2086
            run tp-rounds 590 python benchmarks/scale_out.py --skip-dp --rounds "${TP_ROUNDS:-3}" \
                ${TP_ROUNDS_ENV:+--compare-env "$TP_ROUNDS_ENV"} $CKPT_8B
            tail -14 "$OUT/tp-rounds.txt" ;;
        tp-bound)
            run tp-bound 590 python benchmarks/scale_out.py --skip-dp --rounds 2 \
                --compare-env "KILN_TIMING_SKIP_ALL_REDUCE=1" $CKPT_8B
            tail -10 "$OUT/tp-bound.txt" ;;
        tp-bisect)  # (TP_BISECT: the env switch sets, ';'-separated)
            run tp-bisect 590 python benchmarks/scale_out.py --skip-dp \
                --compare-env "${TP_BISECT:-KILN_UNPACK_IN_GRAPH=0;KILN_DECODE_MAX_SPLITS=32}" $CKPT_8B
            tail -14 "$OUT/tp-bisect.txt" ;;
        tp-flags)
            run tp-flags 580 python benchmarks/scale_out.py --skip-dp --flags-all-reduce $CKPT_8B
            tail -9 "$OUT/tp-flags.txt" ;;
        tp-nccl-ll)
            KILN_TWO_RANK_ALL_REDUCE=0 NCCL_PROTO=LL run tp-nccl-ll 580 python benchmarks/scale_out.py --skip-dp
            tail -8 "$OUT/tp-nccl-ll.txt" ;;
        tp-profile)
            run tp-profile 400 python benchmarks/profile_decode.py --llama-8b --tensor-parallel-size 2 --kernels-only \
                $CKPT_8B
            grep -A45 "steps of" "$OUT/tp-profile.txt" | cut -c1-160 ;;
        allreduce)
            run allreduce 200 python benchmarks/all_reduce.py
            tail -6 "$OUT/allreduce.txt" ;;
        *)
            echo "unknown section $1 (see the comment at the top)" >&2
            return 2 ;;
    esac
}

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for s in "${@:-kernels paths decode}"; do
    for one in $s; do
        section "$one"
    done
done
