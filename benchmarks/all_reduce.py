"""The decode step's all-reduce alone, on two GPUs: microseconds a call, chained --calls times in a
CUDA graph (as a TP=2 decode step chains its 64), of
- kiln's two-rank kernel (codegen/kernels/two_rank_all_reduce.py, the default at two ranks), in
  each of its protocols ("flags": the data, then a flag behind a fence; "ll": data and epoch in
  every 8-byte word),
- NCCL's all_reduce as `ops.all_reduce` makes it (a copy of the input, then NCCL in place),
- and, for the floor a chained kernel cannot go under, an elementwise add of the same size.
Sizes are element counts of bf16: 4096 is one token of the Llama-3.1-8B shape.

    python benchmarks/all_reduce.py [--sizes 4096,32768] [--calls 64] [--repeats 20]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def time_chain(step, x: torch.Tensor, calls: int, repeats: int, tp) -> float:
    """Microseconds a call of `step`, chained `calls` times in one CUDA graph (median of `repeats`)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        y = x
        for _ in range(3):  # (warm up: Triton compiles, NCCL sets up)
            y = step(y)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = x
        for _ in range(calls):
            y = step(y)
    times = []
    for _ in range(repeats):
        tp.agree(0)  # (both ranks start the replay together)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def rank_main(rank: int, port: int, args) -> None:
    from kiln.codegen.kernels.two_rank_all_reduce import PROTOCOLS, TwoRankAllReduce
    from kiln.ir import ops
    from kiln.ir.parallel import tensor_parallel_group
    from kiln.runtime.tensor_parallel import TensorParallel, _process_group

    torch.cuda.set_device(rank)
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0)
    tp = TensorParallel(rank, 2, "nccl", store, group=_process_group(store, rank, 2, "nccl"))
    sizes = [int(s) for s in args.sizes.split(",")]
    os.environ["KILN_TWO_RANK_ALL_REDUCE"] = "1"
    assert tp.enable_small_all_reduce(max(sizes), torch.bfloat16) == "two_rank"
    first = tp.small_all_reduce
    rows = []
    for n in sizes:
        x = torch.full((n,), 0.5 + rank, dtype=torch.bfloat16, device="cuda")
        times = {}
        for protocol in PROTOCOLS:
            first.region.zero_()  # (a protocol must not read the other's words)
            tp.agree(0)
            small = TwoRankAllReduce(first.region, first.peer_region, torch.bfloat16, first.capacity, protocol)
            with tensor_parallel_group(tp.group, small):
                assert torch.equal(ops.all_reduce(x), torch.full_like(x, 2.0)), f"two-rank sum ({protocol})"
                times[protocol] = time_chain(lambda y: ops.all_reduce(y) * 0.5, x, args.calls, args.repeats, tp)
        with tensor_parallel_group(tp.group, None):
            assert torch.equal(ops.all_reduce(x), torch.full_like(x, 2.0)), "NCCL sum"
            times["NCCL"] = time_chain(lambda y: ops.all_reduce(y) * 0.5, x, args.calls, args.repeats, tp)
        floor = time_chain(lambda y: y * 0.5, x, args.calls, args.repeats, tp)
        rows.append((n, times, floor))
    if rank == 0:
        print(f"2 x {torch.cuda.get_device_name()} | torch {torch.__version__} | bf16 | {args.calls} calls a graph, "
              f"each followed by a multiply (as the step's next kernel), median of {args.repeats} replays")
        names = [*PROTOCOLS, "NCCL"]
        print("\nus a call (and over the multiply alone)\n| elements | " + " | ".join(names) + " | multiply alone |\n|"
              + "---|" * (len(names) + 2))
        for n, times, floor in rows:
            print(f"| {n} | " + " | ".join(f"{times[k]:.2f} ({times[k] - floor:.2f})" for k in names)
                  + f" | {floor:.2f} |")
    tp.agree(0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="4096,32768")
    p.add_argument("--calls", type=int, default=64)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    if torch.cuda.device_count() < 2:
        sys.exit("needs two GPUs")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(rank_main, args=(port, args), nprocs=2)


if __name__ == "__main__":
    main()
