"""The two-rank all-reduce kernel (codegen/kernels/two_rank_all_reduce.py), on CPU: two processes,
each running the kernel under Triton's interpreter, over one shared-memory file that holds both
ranks' receive buffers and flags (each process maps it, as symmetric memory maps the peer's GPU
memory on a GPU), in both protocols. Over a run of calls of different sizes (one program and several, masked tails,
both slots, epochs past the first two, and call counters across the int32 wrap), each rank's output must be the float32 sum of the two
inputs rounded once (as this backend rounds: `cast`), and the two ranks' outputs the same bits."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from kiln.codegen.kernels.two_rank_all_reduce import (  # noqa: E402
    BLOCK, TwoRankAllReduce, region_bytes, two_rank_all_reduce,
)

CALLS = [3000, 1024, 5000, 1, 4096, 2500]  # element counts, one call each, in this order
CAPACITY = 5120

RANK = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from test_two_rank_all_reduce import CALLS, CAPACITY, buffers_of, inputs
from kiln.codegen.kernels.two_rank_all_reduce import two_rank_all_reduce
rank, path, dtype, out = int(sys.argv[2]), sys.argv[3], getattr(torch, sys.argv[4]), sys.argv[5]
buffers = buffers_of(path, rank, dtype, sys.argv[6])
buffers.epochs.fill_(int(sys.argv[7]))  # (the calls so far, as an int32 counter)
torch.save([two_rank_all_reduce(inputs(rank, i, n, dtype), buffers) for i, n in enumerate(CALLS)], out)
"""


REGION = region_bytes(CAPACITY)


def buffers_of(path: str, rank: int, dtype: torch.dtype, protocol: str) -> TwoRankAllReduce:
    """Rank `rank`'s buffers over the shared file: [rank 0's region | rank 1's region]."""
    whole = torch.from_file(path, shared=True, size=2 * REGION, dtype=torch.uint8)
    side = [whole[r * REGION:(r + 1) * REGION] for r in (0, 1)]
    return TwoRankAllReduce(side[rank], side[1 - rank], dtype, CAPACITY, protocol)


def inputs(rank: int, call: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * call + rank)
    return (torch.randn(n, generator=g) * (call + 1)).to(dtype)


def _zeroed(tmp_path):
    """The shared file, both regions zeroed (as the engine zeroes them before either rank calls)."""
    path = tmp_path / "shared"
    path.write_bytes(bytes(2 * REGION))
    return path


def run_ranks(script: str, path, dtype: torch.dtype, tmp_path, *args: str) -> list:
    """Run `script` as ranks 0 and 1, two processes under the interpreter over the shared file;
    what each saved."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    name = str(dtype).removeprefix("torch.")
    ranks = [subprocess.Popen([sys.executable, "-c", script, os.path.dirname(__file__), str(r), str(path), name,
                               str(tmp_path / f"out{r}.pt"), *args], env=env, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    for rank in ranks:
        try:
            _, err = rank.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for r in ranks:
                r.kill()
            pytest.fail("the ranks did not finish: a wait that never ended")
        assert rank.returncode == 0, err[-3000:]
    return [torch.load(tmp_path / f"out{r}.pt") for r in (0, 1)]


START_NEAR_THE_WRAP = 2**31 - 3  # (the int32 call counters pass 2^31 - 1 and go on from -2^31)


@pytest.mark.parametrize("dtype, protocol, start", [
    (torch.bfloat16, "flags", 0), (torch.bfloat16, "ll", 0), (torch.float32, "flags", 0), (torch.float32, "ll", 0),
    (torch.bfloat16, "flags", START_NEAR_THE_WRAP), (torch.bfloat16, "ll", START_NEAR_THE_WRAP),
])
def test_two_ranks_sum_their_inputs_call_after_call(dtype, protocol, start, device, cast, tmp_path):
    if device.type != "cpu":
        pytest.skip("compiled, it needs two GPUs: benchmarks/check_tensor_parallel.py, benchmarks/all_reduce.py")
    path = _zeroed(tmp_path)
    outs = run_ranks(RANK, path, dtype, tmp_path, protocol, str(start))
    for i, n in enumerate(CALLS):
        want = cast(inputs(0, i, n, dtype).float() + inputs(1, i, n, dtype).float(), dtype)
        assert torch.equal(outs[0][i].view(torch.uint8), outs[1][i].view(torch.uint8)), f"call {i}: ranks differ"
        torch.testing.assert_close(outs[0][i], want, rtol=0, atol=0, msg=f"call {i} ({n} elements)")
    if protocol == "flags":  # every program of every call went through: each flag counts the calls that reached it
        for rank in (0, 1):
            flags = buffers_of(str(path), rank, dtype, protocol).flags
            calls = [sum(n > p * BLOCK for n in CALLS) for p in range(flags.numel())]
            want = [(start + c + 2**31) % 2**32 - 2**31 if c else 0 for c in calls]  # (as int32)
            assert flags.tolist() == want


# A gemv that sums its row with the peer's (`quant_gemm.reduced_gemv`: each program sends its values and
# a receiving launch sums), between calls of the kernel: (kind, N, K) per call; "silu": x holds (gate, up); "int8": 8-bit weights; "kernel":
# two_rank_all_reduce of N elements (the two share the buffers' epochs).
GEMV_CALLS = [("float", 3000, 64), ("kernel", 1500, 0), ("silu", 2048, 32), ("float", 5120, 32), ("int8", 700, 64),
              ("kernel", 5000, 0), ("float", 1, 16)]

RANK_GEMV = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from test_two_rank_all_reduce import GEMV_CALLS, buffers_of, gemv_call
rank, path, dtype, out = int(sys.argv[2]), sys.argv[3], getattr(torch, sys.argv[4]), sys.argv[5]
buffers = buffers_of(path, rank, dtype, "ll")
torch.save([gemv_call(rank, i, dtype, buffers) for i in range(len(GEMV_CALLS))], out)
"""


def gemv_call(rank: int, call: int, dtype: torch.dtype, buffers: TwoRankAllReduce | None) -> torch.Tensor:
    """Call `call` of GEMV_CALLS on rank `rank`'s inputs: summed with the peer's through `buffers`
    (`reduced_gemv`), or (None) this rank's partial alone, by the same gemv without it."""
    from kiln.codegen.kernels import quant_gemm
    from kiln.ir import quant_ops as Q

    kind, n, k = GEMV_CALLS[call]
    if kind == "kernel":
        x = inputs(rank, call, n, dtype)
        return two_rank_all_reduce(x, buffers) if buffers is not None else x
    g = torch.Generator().manual_seed(1000 * call + rank)
    x = torch.randn(1, 2 * k if kind == "silu" else k, generator=g).to(dtype)
    w, w_scale = (torch.randn(n, k, generator=g) * k ** -0.5).to(dtype), None
    if kind == "int8":
        w, w_scale = Q.quantize_weight(w.float(), "int8")
    activation = "silu" if kind == "silu" else None
    if buffers is not None:
        return quant_gemm.reduced_gemv(x, w, buffers, activation, w_scale=w_scale)
    if w_scale is not None:
        return quant_gemm.weight_only_linear(x, w, w_scale, None)
    return quant_gemm.act_and_mul_gemv(x, "silu", w) if activation else quant_gemm.float_linear(x, w)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_gemv_sums_its_row_with_the_peers(dtype, device, cast, tmp_path):
    """reduced_gemv: each rank's gemv (plain, gated, 8-bit) summed with the peer's by a receiving
    launch after programs that each sent their values, in calls mixed with the all-reduce kernel's
    over the same buffers: the float32 sum of the two ranks' partial rows (each as the gemv alone
    rounds it) rounded once, the same bits on both."""
    if device.type != "cpu":
        pytest.skip("compiled, it needs two GPUs: benchmarks/check_tensor_parallel.py")
    path = _zeroed(tmp_path)
    outs = run_ranks(RANK_GEMV, path, dtype, tmp_path)
    for i, (kind, n, _) in enumerate(GEMV_CALLS):
        want = cast(gemv_call(0, i, dtype, None).float() + gemv_call(1, i, dtype, None).float(), dtype)
        assert torch.equal(outs[0][i].view(torch.uint8), outs[1][i].view(torch.uint8)), f"call {i}: ranks differ"
        torch.testing.assert_close(outs[0][i], want, rtol=0, atol=0, msg=f"call {i} ({kind}, {n})")


def test_a_gemv_alone_fails_its_sum_instead_of_hanging(device, tmp_path, monkeypatch):
    """The peer never comes: after max_spins polls the receiving launch fails (its device assert,
    kept on a GPU by the kernel's debug flag) instead of spinning forever."""
    if device.type != "cpu":
        pytest.skip("run on CPU (on a GPU the assert leaves the process's CUDA context unusable)")
    from triton.runtime import interpreter

    from kiln.codegen.kernels import quant_gemm

    builder = interpreter.interpreter_builder
    monkeypatch.setattr(builder, "options", dataclasses.replace(builder.options, debug=True))
    with pytest.raises(Exception, match="peer rank never arrived"):
        quant_gemm.reduced_gemv(torch.ones(1, 16), torch.ones(8, 16),
                                buffers_of(str(_zeroed(tmp_path)), 0, torch.float32, "ll"), max_spins=10)


@pytest.mark.parametrize("protocol", ["flags", "ll"])
def test_a_peer_that_never_comes_is_an_error_not_a_hang(protocol, device, tmp_path, monkeypatch):
    """Alone (the peer's process gone), the wait ends after max_spins polls in a device-side
    assert: the call fails instead of spinning forever or returning a sum with garbage in it."""
    if device.type != "cpu":
        pytest.skip("run on CPU (on a GPU the assert leaves the process's CUDA context unusable)")
    from triton.runtime import interpreter

    # The kernel is compiled with debug=True, which keeps its device_assert on a GPU; the interpreter
    # ignores a kernel's flag (its builder's options are fixed), so turn debug on there as well.
    builder = interpreter.interpreter_builder
    monkeypatch.setattr(builder, "options", dataclasses.replace(builder.options, debug=True))
    path = tmp_path / "shared"
    path.write_bytes(bytes(2 * REGION))
    buffers = buffers_of(str(path), 0, torch.float32, protocol)
    with pytest.raises(Exception, match="peer rank never arrived"):  # (the interpreter wraps the AssertionError)
        two_rank_all_reduce(torch.ones(10), buffers, max_spins=20)
    if protocol == "flags":  # it had published its part
        assert buffers.peer_flags[0].item() == 1
    else:  # its part, tagged with the call's epoch
        assert buffers.peer_recv[1, 0].item() == (1 << 32) | torch.tensor(1.0).view(torch.int32).item()


def test_inputs_it_cannot_take_are_refused(tmp_path):
    path = tmp_path / "shared"
    path.write_bytes(bytes(2 * REGION))
    buffers = buffers_of(str(path), 0, torch.float32, "flags")
    with pytest.raises(ValueError, match="at most 5120"):
        two_rank_all_reduce(torch.ones(CAPACITY + 1), buffers)
    with pytest.raises(ValueError, match="float32"):
        two_rank_all_reduce(torch.ones(4, dtype=torch.bfloat16), buffers)
    region = torch.zeros(REGION, dtype=torch.uint8)
    with pytest.raises(ValueError, match=f"regions of {REGION} bytes"):
        TwoRankAllReduce(region[:-1], region, torch.float32, CAPACITY)
    with pytest.raises(ValueError, match="unknown two-rank all-reduce protocol 'simple'"):
        TwoRankAllReduce(region, region, torch.float32, CAPACITY, "simple")
    with pytest.raises(ValueError, match="16- and 32-bit floats"):
        TwoRankAllReduce(region, region, torch.float64, CAPACITY)


@pytest.mark.parametrize("fused, rows, protocol, takes", [
    (True, 1, "ll", "reduced_gemv"), (False, 1, "ll", "all_reduce"), (True, 3, "ll", "all_reduce"),
    (True, 1, "flags", "all_reduce"),
])
def test_linear_all_reduce_takes_the_fused_gemv_only_where_it_can(fused, rows, protocol, takes, device, tmp_path,
                                                                   monkeypatch):
    """triton_ops.linear_all_reduce, the op's CUDA implementation: with FUSED_ALL_REDUCE on, a
    one-row step at two ranks whose small all-reduce has "ll" buffers is one reduced_gemv; off,
    several rows, or "flags" buffers: the linear (the gemv at one row), then all_reduce."""
    from kiln.codegen import triton_ops
    from kiln.codegen.kernels import quant_gemm
    from kiln.ir import ops
    from kiln.ir.parallel import tensor_parallel_group

    class TwoRanks:
        def size(self):
            return 2

    calls = []
    monkeypatch.setattr(triton_ops, "FUSED_ALL_REDUCE", fused)
    monkeypatch.setattr(quant_gemm, "reduced_gemv",
                        lambda x, w, *a, **k: calls.append("reduced_gemv") or x[..., :1])
    monkeypatch.setattr(ops, "all_reduce", lambda y: calls.append("all_reduce") or y)
    monkeypatch.setattr(triton_ops, "_float_gemv", True)
    buffers = buffers_of(str(_zeroed(tmp_path)), 0, torch.bfloat16, protocol)
    x = torch.randn(rows, 32, device=device).to(torch.bfloat16)
    w = torch.randn(8, 16, device=device).to(torch.bfloat16)
    with tensor_parallel_group(TwoRanks(), buffers):
        triton_ops.linear_all_reduce(x, "silu", [w], [])
    assert calls == [takes]


def test_the_timing_switch_leaves_the_all_reduce_out(device, tmp_path, monkeypatch):
    """KILN_TIMING_SKIP_ALL_REDUCE=1 (timing only): linear_all_reduce is this rank's linear alone,
    with neither the fused gemv's exchange nor the all_reduce, so a step's time shows what the
    exchanges cost it."""
    from kiln.codegen import triton_ops
    from kiln.codegen.kernels import quant_gemm
    from kiln.ir import ops
    from kiln.ir.parallel import tensor_parallel_group

    class TwoRanks:
        def size(self):
            return 2

    monkeypatch.setattr(triton_ops, "TIMING_SKIP_ALL_REDUCE", True)
    monkeypatch.setattr(triton_ops, "FUSED_ALL_REDUCE", True)
    monkeypatch.setattr(quant_gemm, "reduced_gemv", lambda *a, **k: pytest.fail("exchanged"))
    monkeypatch.setattr(ops, "all_reduce", lambda y: pytest.fail("all-reduced"))
    buffers = buffers_of(str(_zeroed(tmp_path)), 0, torch.float32, "ll")
    x = torch.randn(1, 32, device=device)
    w = torch.randn(8, 16, device=device)
    with tensor_parallel_group(TwoRanks(), buffers):
        gated = triton_ops.linear_all_reduce(x, "silu", [w], [])
        plain = triton_ops.linear_all_reduce(x[:, :16], "", [w], [])
    gate, up = x.chunk(2, -1)
    torch.testing.assert_close(gated, torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, w))
    torch.testing.assert_close(plain, torch.nn.functional.linear(x[:, :16], w))


def test_a_receive_only_call_needs_ll_buffers(tmp_path):
    buffers = buffers_of(str(_zeroed(tmp_path)), 0, torch.float32, "flags")
    with pytest.raises(ValueError, match="receive-only call needs the \"ll\" protocol"):
        two_rank_all_reduce(torch.ones(4), buffers, send=False)
