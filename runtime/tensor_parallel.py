"""Tensor parallelism: one model split over N ranks (frontend/sharding.py says how), each rank a
process, joined by torch.distributed (gloo on CPU, NCCL on CUDA).

Rank 0 is the engine's own process: its scheduler, sampler and detokenizer serve the requests.
Ranks 1..N-1 are worker processes started with torch.multiprocessing (spawn); each builds the same
`LLMEngine` around its own shard of the weights and its own KV cache (sharded by KV heads), then
waits for steps. Each step rank 0 sends the step's inputs (token ids, positions, the forward
context's attention metadata) down a pipe to every worker, and all ranks run their shard's forward,
meeting in its all_reduces; when rank 0 asks for logits, the workers join the all_gather of the
vocab-parallel head. Only rank 0 samples.

The group is torch.distributed's own process group, built on a TCPStore at 127.0.0.1 (what
`init_method="tcp://..."` builds), but not installed as the process's default group: rank 0 is the
user's process, which may hold several engines, or use torch.distributed itself.

Failure: a worker that raises reports its traceback down its pipe and exits; one that is killed
just exits. Either way rank 0's next collective fails at once (gloo sees the peer's connection
close; a peer that hangs, or NCCL, meets the group's timeout), and rank 0 raises an error naming
the worker, stops the others, and serves no more requests.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import os
import time
import traceback
import weakref
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kiln.frontend.sharding import Shard, check_divisible, tp_plan
from kiln.ir import ForwardContext, get_forward_context, ops, set_forward_context
from kiln.ir.parallel import tensor_parallel_group
from kiln.runtime.model_runner import ModelRunner

# A collective's time limit. Generous: the first one waits for every rank to load its shard.
TIMEOUT = datetime.timedelta(minutes=10)
# A worker process's start (spawn, imports) until it says hello.
START_TIMEOUT_S = 300.0
# After a failed collective, how long to wait for a dying worker's report or exit to land.
DIAGNOSE_S = 2.0


def launch(config, hf_config, model_cls: type, architecture: str, device: torch.device) -> "TensorParallel":
    """Rank 0: check that the model splits over config.tensor_parallel_size ranks, start the
    workers (each builds its engine from `config`) and join the group with them."""
    n = config.tensor_parallel_size
    if config.runner != "generate":
        raise ValueError(f"tensor_parallel_size={n}: tensor parallelism serves generate models; runner="
                         f"{config.runner!r} is not supported yet")
    if getattr(hf_config, "is_encoder_decoder", False):
        raise ValueError(f"tensor_parallel_size={n}: {architecture} is an encoder-decoder model, which tensor "
                         "parallelism does not serve yet")
    if getattr(hf_config, "quantization_config", None) is not None:
        raise ValueError(f"tensor_parallel_size={n}: pre-quantized checkpoints are not sharded yet")
    check_divisible(hf_config, n)
    tp_plan(model_cls, hf_config, architecture)  # (raises when the model has no plan kiln can run)
    if device.type == "cuda" and torch.cuda.device_count() < n:
        raise ValueError(f"tensor_parallel_size={n} needs {n} GPUs, one per rank; this machine has "
                         f"{torch.cuda.device_count()}")
    if device.type == "cuda" and device.index not in (None, 0):
        raise ValueError(f"tensor_parallel_size={n} puts rank r on cuda:r: pass device='cuda' (not {device})")
    if mp.current_process().daemon:
        raise ValueError(f"tensor_parallel_size={n}: a daemon process (a data-parallel replica) cannot start "
                         "tensor-parallel workers")
    backend = "nccl" if device.type == "cuda" else "gloo"
    store = dist.TCPStore("127.0.0.1", 0, n, is_master=True, wait_for_workers=False, timeout=TIMEOUT)
    context = mp.get_context("spawn")
    workers = []
    for rank in range(1, n):
        parent, child = context.Pipe()
        process = context.Process(target=_worker_main, args=(child, config, rank, n, store.port, backend),
                                  daemon=True, name=f"kiln-tp-worker-{rank}")
        process.start()
        child.close()
        workers.append(_Worker(rank, parent, process))
    tp = TensorParallel(0, n, backend, store, workers)
    try:
        for worker in workers:
            tp.expect_hello(worker)
        tp.group = _process_group(store, 0, n, backend)
    except BaseException:
        tp.shutdown("start failed")
        raise
    return tp


@dataclass
class _Worker:
    rank: int
    conn: object  # rank 0's end of the worker's pipe
    process: mp.Process


class TensorParallel:
    """One rank's side of the group: its rank, the process group, its Shard of the model; on rank
    0 also the worker processes, the step messages to them, and the handling of their failure."""

    def __init__(self, rank: int, world_size: int, backend: str, store, workers: list[_Worker] = (), group=None):
        self.rank, self.world_size, self.backend = rank, world_size, backend
        self.store, self.group, self.workers = store, group, list(workers)
        self.model_shard: Shard | None = None
        self.closed: str | None = None  # why the group was shut down
        # rank 0: stop the workers when this object goes away (engine dropped, interpreter exit)
        self._stop = weakref.finalize(self, _stop_workers, self.workers)

    def shard(self, model_cls: type, config, architecture: str) -> Shard:
        """This rank's Shard of the model (the loader's `shard`)."""
        self.model_shard = Shard(tp_plan(model_cls, config, architecture), self.rank, self.world_size)
        return self.model_shard

    def agree(self, value: int) -> int:
        """The minimum of `value` over the ranks: every rank must allocate as many KV blocks."""
        with self.step():
            t = torch.tensor([value], device="cuda" if self.backend == "nccl" else "cpu")
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())

    def make_runner(self, *args, **kwargs) -> ModelRunner:
        """The engine's runner on this rank: rank 0's drives the workers; a worker's is a plain one."""
        return TensorParallelRunner(self, *args, **kwargs) if self.rank == 0 else ModelRunner(*args, **kwargs)

    # ------------------------------------------------------------ rank 0

    @contextlib.contextmanager
    def step(self):
        """Around rank 0's part of a step: the collectives run over the group, and any failure ends
        the group with an error that names its cause (workers only set the group)."""
        if self.rank != 0:
            with tensor_parallel_group(self.group):
                yield
            return
        if self.closed is not None:
            raise RuntimeError(f"the tensor-parallel workers are shut down ({self.closed}); this engine serves no "
                               "more requests")
        try:
            for worker in self.workers:
                if not worker.process.is_alive():
                    raise RuntimeError(f"tensor-parallel worker {worker.rank} is gone")
            with tensor_parallel_group(self.group):
                yield
        except Exception as e:
            raise self.failed(e) from e
        except BaseException:  # (an interrupt mid-step leaves the ranks out of step: the group cannot go on)
            self.shutdown("interrupted mid-step")
            raise

    def send(self, message) -> None:
        for worker in self.workers:
            worker.conn.send(message)

    def failed(self, error: BaseException) -> RuntimeError:
        """After a failed step: find the worker that raised (its traceback) or died (its exit code),
        stop the others, and return the error for rank 0 to raise."""
        reason, deadline = None, time.monotonic() + DIAGNOSE_S
        while reason is None and time.monotonic() < deadline and self.workers:
            for worker in self.workers:
                report = _poll_report(worker)
                if report is not None:
                    reason = f"worker {worker.rank} raised:\n{report}"
                elif not worker.process.is_alive():
                    reason = f"worker {worker.rank} (pid {worker.process.pid}) died, exit code {worker.process.exitcode}"
                if reason is not None:
                    break
            else:
                time.sleep(0.05)
        reason = reason or f"rank 0 failed: {type(error).__name__}: {error}"
        self.shutdown(reason.splitlines()[0])
        return RuntimeError(f"tensor parallelism failed, {reason}\nThe other workers have been shut down; this engine "
                            "serves no more requests.")

    def expect_hello(self, worker: _Worker) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not worker.conn.poll(0.1):
            if time.monotonic() > deadline:
                raise RuntimeError(f"tensor-parallel worker {worker.rank} did not start within {START_TIMEOUT_S:.0f} s")
        try:
            kind, payload = worker.conn.recv()
        except EOFError:
            worker.process.join(timeout=5)
            raise RuntimeError(
                f"tensor-parallel worker {worker.rank} died while starting (exit code {worker.process.exitcode}); "
                "a script that starts workers must run its code under `if __name__ == '__main__':`, since "
                "spawn re-imports it in every worker") from None
        if kind != "hello":
            raise RuntimeError(f"tensor-parallel worker {worker.rank} failed while starting:\n{payload}")

    def shutdown(self, reason: str = "shut down") -> None:
        """Stop the workers (rank 0). Idempotent."""
        if self.closed is None:
            self.closed = reason
        self.group = self.store = None  # first: a worker blocked in a collective with rank 0 sees it fail
        self._stop()


def _poll_report(worker: _Worker) -> str | None:
    try:
        if worker.conn.poll():
            kind, payload = worker.conn.recv()
            return payload if kind == "error" else None
    except (EOFError, OSError):
        pass
    return None


def _stop_workers(workers: list[_Worker]) -> None:
    for worker in workers:
        with contextlib.suppress(BrokenPipeError, OSError):
            worker.conn.send(("stop", None))
    for worker in workers:
        worker.process.join(timeout=5)
        if worker.process.is_alive():
            worker.process.terminate()
            worker.process.join(timeout=5)
        worker.conn.close()


def _process_group(store, rank: int, world_size: int, backend: str):
    prefix = dist.PrefixStore("kiln-tp", store)
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = TIMEOUT
        return dist.ProcessGroupNCCL(prefix, rank, world_size, options)
    return dist.ProcessGroupGloo(prefix, rank, world_size, TIMEOUT)


# ---------------------------------------------------------------- a step's inputs, rank 0 -> workers


@dataclass
class StepInputs:
    """What a worker needs to run the forward rank 0 runs: the forward's arguments and its forward
    context less the caches (each rank holds its own), tensors as numpy arrays for the pipe."""

    args: tuple
    kwargs: dict
    context: ForwardContext

    @classmethod
    def pack(cls, args: tuple, kwargs: dict, context: ForwardContext) -> "StepInputs":
        return cls(tuple(_host(a) for a in args), {k: _host(v) for k, v in kwargs.items()},
                   dataclasses.replace(context, attn=_map_attributes(context.attn, _host), kv_caches=None,
                                       cross_kv_caches=None))

    def unpack(self, runner: ModelRunner) -> tuple[tuple, dict, ForwardContext]:
        def device(x):
            return torch.from_numpy(x).to(runner.device) if isinstance(x, np.ndarray) else x

        context = dataclasses.replace(self.context, attn=_map_attributes(self.context.attn, device),
                                      kv_caches=runner.kv_caches, cross_kv_caches=runner.cross_kv_caches)
        return tuple(device(a) for a in self.args), {k: device(v) for k, v in self.kwargs.items()}, context


def _host(x):
    return x.cpu().numpy() if isinstance(x, torch.Tensor) else x


def _map_attributes(obj, fn):
    """A shallow copy of obj with fn applied to each attribute (the metadata's fields, and any
    attribute a runner attached to it)."""
    out = copy.copy(obj)
    for name, value in vars(obj).items():
        setattr(out, name, fn(value))
    return out


class TensorParallelRunner(ModelRunner):
    """Rank 0's runner: it sends each step's inputs to the workers before running its own shard,
    and gathers the logits from the ranks' slices of the vocabulary."""

    def __init__(self, tp: TensorParallel, *args, **kwargs):
        self.tp = tp
        super().__init__(*args, **kwargs)

    # The engine sets `forward` (the model, or its compiled forward); ModelRunner.execute calls it
    # inside the forward context, which is where the step's inputs are complete.
    @property
    def forward(self):
        return self._send_then_forward

    @forward.setter
    def forward(self, fn) -> None:
        self.shard_forward = fn

    def _send_then_forward(self, *args, **kwargs):
        self.tp.send(("step", StepInputs.pack(args, kwargs, get_forward_context())))
        return self.shard_forward(*args, **kwargs)

    def execute(self, step):
        with self.tp.step():
            return super().execute(step)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor, rows: list[int]) -> torch.Tensor:
        shard = self.tp.model_shard
        with self.tp.step():
            if not shard.gathers_logits:
                return super().compute_logits(hidden, rows)
            self.tp.send(("logits", rows))
            return ops.all_gather(super().compute_logits(hidden, rows), -1)[:, :shard.vocab_size]


# ---------------------------------------------------------------- the workers


def _worker_main(conn, config, rank: int, world_size: int, port: int, backend: str) -> None:
    """Rank `rank`: join the group, build the engine around this rank's shard, then run the steps
    rank 0 sends until it says stop (or is gone). A failure is reported down the pipe, and the
    process exits, which breaks the group's connections: rank 0 learns at its next collective."""
    from kiln.runtime.engine import LLMEngine

    try:
        conn.send(("hello", None))
        if backend == "nccl":
            torch.cuda.set_device(rank)
        else:  # the ranks share the host's cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=TIMEOUT)
        tp = TensorParallel(rank, world_size, backend, store, group=_process_group(store, rank, world_size, backend))
        device = f"cuda:{rank}" if backend == "nccl" else config.device
        engine = LLMEngine(dataclasses.replace(config, skip_tokenizer_init=True, device=device), tp=tp)
        _serve(engine, conn, tp)
    except BaseException:  # noqa: BLE001 - reported to rank 0, which raises it
        with contextlib.suppress(BrokenPipeError, OSError):
            conn.send(("error", traceback.format_exc()))


@torch.inference_mode()
def _serve(engine, conn, tp: TensorParallel) -> None:
    runner, hidden = engine.runner, None
    with tensor_parallel_group(tp.group):
        while True:
            try:
                kind, payload = conn.recv()
            except EOFError:  # rank 0 is gone
                return
            if kind == "stop":
                return
            if kind == "step":
                args, kwargs, context = payload.unpack(runner)
                with set_forward_context(context):
                    hidden = runner.forward(*args, **kwargs)
            elif kind == "logits":  # join the gather; only rank 0 samples
                ops.all_gather(runner.compute_logits(hidden, payload), -1)
