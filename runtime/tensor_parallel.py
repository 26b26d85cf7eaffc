"""Tensor parallelism: one model split over N ranks (frontend/sharding.py says how), each rank a
process, joined by torch.distributed (gloo on CPU, NCCL on CUDA).

Rank 0 is the engine's own process: its scheduler, sampler and detokenizer serve the requests.
Ranks 1..N-1 are workers, started by `config.distributed_executor_backend`: "mp", processes started
with torch.multiprocessing (spawn) on this host; "ray", Ray actors in a placement group, so the
ranks may span a Ray cluster's machines. Each worker builds the same `LLMEngine` around its own
shard of the weights and its own KV cache (sharded by KV heads), then waits for steps. Each step
rank 0 sends the step's inputs (token ids, positions, the forward context's attention metadata) to
every worker (down a pipe, or as an actor call), and all ranks run their shard's forward, meeting
in its all_reduces; when rank 0 asks for logits, the workers join the all_gather of the
vocab-parallel head. A decode step the CUDA graphs cover is one message: every rank's graph
computes its shard's logits and gathers them too. Only rank 0 samples.

The group is torch.distributed's own process group, built on a TCPStore at rank 0 (127.0.0.1, or
with Ray the node's IP; what `init_method="tcp://..."` builds), but not installed as the process's
default group: rank 0 is the user's process, which may hold several engines, or use
torch.distributed itself.

Failure: a worker that raises reports its traceback (down its pipe; a Ray actor into the store) and
exits; one that is killed just exits. Either way rank 0's next collective fails at once (gloo sees
the peer's connection close; a peer that hangs, or NCCL, meets the group's timeout), and rank 0
raises an error naming the worker, stops the others, and serves no more requests.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import functools
import gc
import logging
import os
import tempfile
import threading
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

logger = logging.getLogger("kiln")

# A collective's time limit. Generous: the first one waits for every rank to load its shard.
TIMEOUT = datetime.timedelta(minutes=10)
# A worker process's start (spawn, imports) until it says hello.
START_TIMEOUT_S = 300.0
# After a failed collective, how long to wait for a dying worker's report or exit to land.
DIAGNOSE_S = 2.0
# The same for a Ray actor, whose death reaches rank 0 through Ray's control plane.
RAY_DIAGNOSE_S = 10.0


def launch(config, hf_config, model_cls: type, architecture: str, device: torch.device) -> "TensorParallel":
    """Rank 0: check that the model splits over config.tensor_parallel_size ranks, start the
    workers (each builds its engine from `config`) and join the group with them."""
    n = config.tensor_parallel_size
    if getattr(hf_config, "is_encoder_decoder", False):
        raise ValueError(f"tensor_parallel_size={n}: {architecture} is an encoder-decoder model, which tensor "
                         "parallelism does not serve yet")
    check_divisible(hf_config, n, model_cls)
    tp_plan(model_cls, hf_config, architecture)  # (raises when the model has no plan kiln can run)
    # rank r runs on cuda:(first + r), first being this engine's own GPU (a data-parallel replica's)
    first = (device.index or 0) if device.type == "cuda" else 0
    backend = "nccl" if device.type == "cuda" else "gloo"
    if config.distributed_executor_backend == "ray":
        if first:
            raise ValueError(f"tensor_parallel_size={n} on Ray places its ranks itself: pass device='cuda' (not {device})")
        return _launch_ray(config, n, backend)
    if device.type == "cuda" and torch.cuda.device_count() < first + n:
        raise ValueError(f"tensor_parallel_size={n} needs {n} GPUs, one per rank{f' from cuda:{first}' if first else ''}; "
                         f"this machine has {torch.cuda.device_count()}")
    if mp.current_process().daemon:
        raise ValueError(f"tensor_parallel_size={n}: a daemon process (a data-parallel replica) cannot start "
                         "tensor-parallel workers")
    store = dist.TCPStore("127.0.0.1", 0, n, is_master=True, wait_for_workers=False, timeout=TIMEOUT)
    context = mp.get_context("spawn")
    workers = []
    for rank in range(1, n):
        parent, child = context.Pipe()
        process = context.Process(target=_worker_main, args=(child, config, rank, n, store.port, backend),
                                  kwargs={"cuda_index": first + rank}, daemon=True, name=f"kiln-tp-worker-{rank}")
        process.start()
        child.close()
        workers.append(_Worker(rank, parent, process))
    tp = TensorParallel(0, n, backend, store, workers)
    try:
        for worker in workers:
            worker.expect_hello()
        tp.group = _process_group(store, 0, n, backend)
    except BaseException:
        tp.shutdown("start failed")
        raise
    return tp


@dataclass
class _Worker:
    """A worker process, rank 0's side (a Ray actor's is _RayWorker, with the same methods)."""

    rank: int
    conn: object  # rank 0's end of the worker's pipe
    process: mp.Process
    diagnose_s = DIAGNOSE_S

    def send(self, message) -> None:
        self.conn.send(message)

    def is_alive(self) -> bool:
        return self.process.is_alive()

    def failure(self, store) -> str | None:
        """What went wrong with this worker, if anything has yet: the traceback it reported, or its death."""
        report = _poll_report(self)
        if report is not None:
            return f"worker {self.rank} raised:\n{report}"
        if not self.process.is_alive():
            return f"worker {self.rank} (pid {self.process.pid}) died, exit code {self.process.exitcode}"
        return None

    def expect_hello(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.conn.poll(0.1):
            if time.monotonic() > deadline:
                raise RuntimeError(f"tensor-parallel worker {self.rank} did not start within {START_TIMEOUT_S:.0f} s")
        try:
            kind, payload = self.conn.recv()
        except EOFError:
            self.process.join(timeout=5)
            raise RuntimeError(
                f"tensor-parallel worker {self.rank} died while starting (exit code {self.process.exitcode}); "
                "a script that starts workers must run its code under `if __name__ == '__main__':`, since "
                "spawn re-imports it in every worker") from None
        if kind != "hello":
            raise RuntimeError(f"tensor-parallel worker {self.rank} failed while starting:\n{payload}")

    def request_stop(self) -> None:
        with contextlib.suppress(BrokenPipeError, OSError):
            self.conn.send(("stop", None))

    def join(self) -> None:
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=5)
        self.conn.close()


class TensorParallel:
    """One rank's side of the group: its rank, the process group, its Shard of the model; on rank
    0 also the worker processes, the step messages to them, and the handling of their failure."""

    def __init__(self, rank: int, world_size: int, backend: str, store, workers: list = (), group=None,
                 release=None):
        """workers: rank 0's _Worker (process) or _RayWorker (actor) handles; release: called after
        they stop (the Ray placement group's removal)."""
        self.rank, self.world_size, self.backend = rank, world_size, backend
        self.store, self.group, self.workers = store, group, list(workers)
        self.model_shard: Shard | None = None
        self.small_all_reduce = None  # (enable_small_all_reduce)
        self._named_group = None  # (enable_small_all_reduce: the group as symmetric memory finds it)
        self._symmetric_buffer = None  # (enable_small_all_reduce: this rank's symmetric memory, kept alive)
        self.closed: str | None = None  # why the group was shut down
        # Called before the group is dropped: CUDA graphs that captured NCCL collectives hold the
        # communicator, whose destruction waits until they are gone (pytorch/pytorch#115388).
        self.before_shutdown: list = []
        # rank 0: stop the workers when this object goes away (engine dropped, interpreter exit)
        self._stop = weakref.finalize(self, _stop_workers, self.workers, release)

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

    def enable_small_all_reduce(self, numel: int, dtype: torch.dtype, custom: bool = True) -> str:
        """All-reduces of up to `numel` elements of `dtype` (a decode batch's hidden states) through
        memory the ranks share (NVLink) instead of the group's own collective, where that is
        possible. Collective: every rank calls it at the same point of its engine's start. Returns
        what sums them: "two_rank", "one_shot", or the backend's name ("nccl", "gloo"; always with
        custom=False, the engine's `disable_custom_all_reduce`).
        - Two ranks over NCCL whose GPUs can reach each other's memory (the default; off with
          KILN_TWO_RANK_ALL_REDUCE=0): kiln's kernel, which pushes each rank's tensor into the
          peer's buffer and sums there, no copy of the input and no NCCL kernel
          (codegen/kernels/two_rank_all_reduce.py); up to 128K elements, the backend's beyond. On
          two H200s, the Llama-3.1-8B shape's batch-1 step: 3.485 ms over NCCL, 3.012 with the
          kernel's "flags" protocol, 2.865 with "ll" (the default protocol), NCCL's greedy tokens
          with each. Over gloo it runs only when asked for (KILN_TWO_RANK_ALL_REDUCE=1) under
          Triton's interpreter (tests): a shared-memory file stands in for symmetric memory, as
          `cudagraph="emulate"` does for CUDA graphs.
        - KILN_ONE_SHOT_ALL_REDUCE=1 (NCCL, experimental): torch's one-shot kernel over symmetric
          memory (copies this rank's tensor into its buffer, then sums every rank's). On two H100s
          it gave NCCL's tokens but was the slower, 4.38 against 4.21 ms/token."""
        if not custom:
            return self.backend
        one_shot = os.environ.get("KILN_ONE_SHOT_ALL_REDUCE") == "1" and self.backend == "nccl"
        switch = os.environ.get("KILN_TWO_RANK_ALL_REDUCE", "auto")
        if one_shot:
            import torch.distributed._symmetric_memory as symm_mem

            buffer = symm_mem.empty(numel, dtype=dtype, device=torch.device("cuda", torch.cuda.current_device()))
            name = self._symmetric_memory_group()
            symm_mem.rendezvous(buffer, name)
            self.small_all_reduce = OneShotAllReduce(name, buffer)
            return "one_shot"
        if self.world_size != 2 or switch == "0":
            return self.backend
        if self.backend == "nccl":
            if not self.agree(int(self._peer_memory_reachable())):
                return self.backend
        elif not (switch == "1" and os.environ.get("TRITON_INTERPRET") == "1"):
            return self.backend
        from kiln.codegen.kernels import two_rank_all_reduce as kernel

        capacity = min(-(-numel // kernel.BLOCK), 128) * kernel.BLOCK  # (at most 128 programs: all resident)
        nbytes = kernel.region_bytes(capacity)
        if self.backend == "nccl":
            # Symmetric memory this torch, driver or host cannot give is no error: NCCL sums then. Its
            # setup exchanges handles through the store, not the group's collectives, so a rank that
            # fails early leaves no collective unpaired; the other's exchange times out and fails too.
            try:
                side = self._symmetric_sides(nbytes)
            except Exception as e:  # noqa: BLE001
                logger.warning("kiln: no symmetric memory for the two-rank all-reduce (%s: %s); NCCL's instead",
                               type(e).__name__, e)
                side = None
            if not self.agree(int(side is not None)):  # (both ranks fall back if either must)
                return self.backend
        else:
            side = self._shared_file_sides(nbytes)
        region, peer_region = side(self.rank), side(1 - self.rank)
        region.zero_()
        # (both ranks must speak the same protocol: the first of the ones they were told; agree's
        # all-reduce also queues behind the zeroing and completes on neither rank before both have
        # reached it, so both regions are zero before either rank's first call writes the other's)
        protocol = kernel.PROTOCOLS[self.agree(kernel.PROTOCOLS.index(kernel.PROTOCOL))]
        self.small_all_reduce = kernel.TwoRankAllReduce(region, peer_region, dtype, capacity, protocol)
        return "two_rank"

    def _peer_memory_reachable(self) -> bool:
        """Whether this rank's GPU can address the other rank's (the same host, the peer's GPU
        visible to this process, peer access between them: NVLink or PCIe peer-to-peer). Each rank
        names its GPU in the store, so the answer needs no collective that could fail on one rank."""
        import socket

        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        self.store.set(f"kiln-gpu-{self.rank}", f"{socket.gethostname()} {props.uuid}")
        host, uuid = self.store.get(f"kiln-gpu-{1 - self.rank}").decode().split(" ", 1)
        if host != socket.gethostname():
            return False
        visible = [i for i in range(torch.cuda.device_count()) if str(torch.cuda.get_device_properties(i).uuid) == uuid]
        return bool(visible) and torch.cuda.can_device_access_peer(torch.cuda.current_device(), visible[0])

    def _symmetric_sides(self, nbytes: int):
        """rank -> that rank's `nbytes` of symmetric memory (NVLink), as this process sees them."""
        import torch.distributed._symmetric_memory as symm_mem

        buffer = symm_mem.empty(nbytes, dtype=torch.uint8, device=torch.device("cuda", torch.cuda.current_device()))
        handle = symm_mem.rendezvous(buffer, self._symmetric_memory_group())
        # (get_buffer's views do not own the memory: this rank's allocation lives as long as `buffer`,
        # so the engine keeps it; freed, its pages are unmapped under the kernel)
        self._symmetric_buffer = buffer
        return lambda rank: handle.get_buffer(rank, (nbytes,), torch.uint8, 0)

    def _shared_file_sides(self, nbytes: int):
        """The same over gloo: one shared-memory file that every rank maps (rank 0 makes it zeroed,
        and removes its name once every rank has mapped it)."""
        path = os.path.join(tempfile.gettempdir(), f"kiln-two-rank-{self.store.port}")
        if self.rank == 0:
            with open(path, "wb") as f:
                f.truncate(self.world_size * nbytes)
        self.agree(0)
        whole = torch.from_file(path, shared=True, size=self.world_size * nbytes, dtype=torch.uint8)
        self.agree(0)
        if self.rank == 0:
            os.unlink(path)
        return lambda rank: whole[rank * nbytes:(rank + 1) * nbytes]

    def _symmetric_memory_group(self) -> str:
        """The group's name as symmetric memory looks it up. It finds groups by name in c10d's
        registry, which holds ProcessGroups; ours is a bare NCCL backend (built without
        init_process_group): wrap it in one, as init_process_group would, and register that. Older
        torch took the group's rank, size and store directly instead."""
        from torch._C._distributed_c10d import _register_process_group, _SymmetricMemory

        name = f"kiln-tp-{self.store.port}"
        named = dist.ProcessGroup(dist.PrefixStore("kiln-symm-mem", self.store), self.rank, self.world_size)
        named._set_default_backend(dist.ProcessGroup.BackendType.NCCL)
        named._register_backend(torch.device("cuda"), dist.ProcessGroup.BackendType.NCCL, self.group)
        _register_process_group(name, named)
        self._named_group = named
        if hasattr(_SymmetricMemory, "set_group_info"):
            _SymmetricMemory.set_group_info(name, self.rank, self.world_size,
                                            dist.PrefixStore("kiln-symm-mem", self.store))
        return name

    def gathered_logits(self, logits):
        """The decode graphs' logits function on every rank: `logits` (this rank's shard of the
        vocabulary, for a vocabulary-parallel head), all-gathered into the whole vocabulary. Every
        rank runs it inside its graphs, so the gather is captured with them; only rank 0 reads it."""
        shard = self.model_shard
        if logits is None or not shard.gathers_logits:
            return logits

        def gathered(hidden: torch.Tensor) -> torch.Tensor:
            return ops.all_gather(logits(hidden), -1)[:, :shard.vocab_size]

        return gathered

    def make_runner(self, *args, **kwargs) -> ModelRunner:
        """The engine's runner on this rank: rank 0's drives the workers; a worker's is a plain one."""
        return TensorParallelRunner(self, *args, **kwargs) if self.rank == 0 else ModelRunner(*args, **kwargs)

    # ------------------------------------------------------------ rank 0

    @contextlib.contextmanager
    def step(self):
        """Around rank 0's part of a step: the collectives run over the group, and any failure ends
        the group with an error that names its cause (workers only set the group)."""
        if self.rank != 0:
            with tensor_parallel_group(self.group, self.small_all_reduce):
                yield
            return
        if self.closed is not None:
            raise RuntimeError(f"the tensor-parallel workers are shut down ({self.closed}); this engine serves no "
                               "more requests")
        try:
            for worker in self.workers:
                if not worker.is_alive():
                    raise RuntimeError(f"tensor-parallel worker {worker.rank} is gone")
            with tensor_parallel_group(self.group, self.small_all_reduce):
                yield
        except Exception as e:
            raise self.failed(e) from e
        except BaseException:  # (an interrupt mid-step leaves the ranks out of step: the group cannot go on)
            self.shutdown("interrupted mid-step")
            raise

    def send(self, message) -> None:
        for worker in self.workers:
            worker.send(message)

    def failed(self, error: BaseException) -> RuntimeError:
        """After a failed step: find the worker that raised (its traceback) or died (its exit code),
        stop the others, and return the error for rank 0 to raise."""
        reason, deadline = None, time.monotonic() + max((w.diagnose_s for w in self.workers), default=0)
        while reason is None and time.monotonic() < deadline and self.workers:
            for worker in self.workers:
                reason = worker.failure(self.store)
                if reason is not None:
                    break
            else:
                time.sleep(0.05)
        reason = reason or f"rank 0 failed: {type(error).__name__}: {error}"
        self.shutdown(reason.splitlines()[0])
        return RuntimeError(f"tensor parallelism failed, {reason}\nThe other workers have been shut down; this engine "
                            "serves no more requests.")

    def shutdown(self, reason: str = "shut down") -> None:
        """Stop the workers (rank 0). Idempotent."""
        if self.closed is None:
            self.closed = reason
        for worker in self.workers:  # a worker waiting for its next step drops its graphs and group, and exits
            worker.request_stop()
        if self.before_shutdown:
            while self.before_shutdown:
                self.before_shutdown.pop()()
            gc.collect()
        self.group = self.store = None  # a worker blocked in a collective with rank 0 sees it fail
        self._stop()


def _poll_report(worker: _Worker) -> str | None:
    try:
        if worker.conn.poll():
            kind, payload = worker.conn.recv()
            return payload if kind == "error" else None
    except (EOFError, OSError):
        pass
    return None


def _stop_workers(workers: list, release=None) -> None:
    for worker in workers:
        worker.request_stop()
    for worker in workers:
        worker.join()
    if release is not None:
        release()


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
            if not isinstance(x, np.ndarray):
                return x
            # (Ray hands over read-only views of its object store)
            return torch.from_numpy(x if x.flags.writeable else x.copy()).to(runner.device)

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

    # Decode CUDA graphs (every rank captured the same ones): a decode step they cover sends its
    # inputs, host lists, to the workers, which replay their graph as rank 0 replays its own.
    @property
    def decode_graphs(self):
        return self._graphs_over_group

    @decode_graphs.setter
    def decode_graphs(self, graphs) -> None:
        self._graphs_over_group = None if graphs is None else _GraphsOverGroup(self.tp, graphs)
        if graphs is not None:
            self.tp.before_shutdown.append(functools.partial(setattr, self, "decode_graphs", None))

    def execute(self, step, fill=None):
        with self.tp.step():
            return super().execute(step, fill)

    def execute_pooling(self, step):
        with self.tp.step():
            return super().execute_pooling(step)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor, rows: list[int], index: torch.Tensor | None = None) -> torch.Tensor:
        shard = self.tp.model_shard
        captured = self.decode_graphs.logits_of(hidden) if self.decode_graphs is not None else None
        if captured is not None and rows == list(range(len(hidden))):
            return captured  # (gathered inside every rank's graph: no message to the workers)
        with self.tp.step():
            if not shard.gathers_logits:
                return super().compute_logits(hidden, rows, index)
            self.tp.send(("logits", rows))
            return ops.all_gather(super().compute_logits(hidden, rows, index), -1)[:, :shard.vocab_size]


class OneShotAllReduce:
    """Sums small CUDA tensors over the group through a symmetric-memory buffer (torch's
    `symm_mem::one_shot_all_reduce_copy`: no NVLink multicast)."""

    def __init__(self, name: str, buffer: torch.Tensor):
        self.name, self.buffer = name, buffer

    def takes(self, x: torch.Tensor) -> bool:
        return x.is_cuda and x.dtype == self.buffer.dtype and x.numel() <= self.buffer.numel()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.contiguous().view(-1)
        out = torch.ops.symm_mem.one_shot_all_reduce_copy(self.buffer[:flat.numel()], flat, "sum", self.name)
        return out.view(x.shape)


def _broadcast_from_rank0(tensor: torch.Tensor, group) -> None:
    """Rank 0's `tensor` into every rank's, in place. (The group's own method: it is not registered
    as a torch.distributed group, so dist.broadcast cannot map its ranks. With NCCL, wait() makes
    the current stream wait, not the host.)"""
    options = dist.BroadcastOptions()
    options.rootRank = 0
    group.broadcast([tensor], options).wait()


# Whether the workers read the last replay's argmax from their own graphs when rank 0's tokens are
# its own graph's (`DecodeGraphs.takes_own`), instead of rank 0 broadcasting them. Every rank's
# graph computes that argmax from the same gathered logits (the all-gather hands every rank the same
# bytes), so it is rank 0's: on two H200s in bf16 the workers' own tokens gave the broadcast run's,
# 4/4 prompts of the 8B shape (session 28), and TP=1's in float32. KILN_TP_OWN_TOKENS=0 broadcasts
# them (`scale_out.py --compare-env KILN_TP_OWN_TOKENS=0` compares the two).
TP_OWN_TOKENS = os.environ.get("KILN_TP_OWN_TOKENS", "1") != "0"


class _GraphsOverGroup:
    """Rank 0's decode graphs: each replay first sends the step's inputs to the workers. Under async
    scheduling the last step's sampled tokens are still on the device: rank 0 broadcasts them over
    the group (queued on the device, no wait on the host) and every rank fills them in itself, or,
    with TP_OWN_TOKENS, each rank reads its own graph's argmax."""

    def __init__(self, tp: TensorParallel, graphs):
        self.tp, self.graphs = tp, graphs

    def fits(self, batch: int) -> bool:
        return self.graphs.fits(batch)

    def logits_of(self, hidden: torch.Tensor) -> torch.Tensor | None:
        return self.graphs.logits_of(hidden)

    def greedy_of(self, logits: torch.Tensor) -> torch.Tensor | None:
        return self.graphs.greedy_of(logits)

    def run(self, input_ids: list[int], *args, fill=None) -> torch.Tensor:
        tokens, rows, src = fill if fill is not None else (None, None, None)
        own = TP_OWN_TOKENS and fill is not None and self.graphs.takes_own(tokens)
        # the workers' `pending`: the rows, their sources, and how many tokens come by broadcast (None: their own)
        pending = None if fill is None else (rows, src, None if own else tokens.numel())
        self.tp.send(("graph", (input_ids, args, pending)))
        if fill is not None and not own:
            _broadcast_from_rank0(tokens.contiguous(), self.tp.group)
        return self.graphs.run(input_ids, *args, fill=fill)


# ---------------------------------------------------------------- the workers


def _worker_main(conn, config, rank: int, world_size: int, port: int, backend: str, host: str = "127.0.0.1",
                 cuda_index: int | None = None) -> None:
    """Rank `rank`: join the group, build the engine around this rank's shard, then run the steps
    rank 0 sends until it says stop (or is gone). A failure is reported down the pipe, and the
    process exits, which breaks the group's connections: rank 0 learns at its next collective.
    `conn`: the pipe, or a Ray actor's _Inbox; `cuda_index`: this rank's GPU (default cuda:rank)."""
    from kiln.runtime.engine import LLMEngine

    try:
        conn.send(("hello", None))
        cuda_index = rank if cuda_index is None else cuda_index
        if backend == "nccl":
            torch.cuda.set_device(cuda_index)
        else:  # the ranks share the host's cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        store = dist.TCPStore(host, port, world_size, is_master=False, timeout=TIMEOUT)
        tp = TensorParallel(rank, world_size, backend, store, group=_process_group(store, rank, world_size, backend))
        device = f"cuda:{cuda_index}" if backend == "nccl" else config.device
        engine = LLMEngine(dataclasses.replace(config, skip_tokenizer_init=True, device=device), tp=tp)
        _serve(engine, conn, tp)
    except BaseException:  # noqa: BLE001 - reported to rank 0, which raises it
        with contextlib.suppress(BrokenPipeError, OSError):
            conn.send(("error", traceback.format_exc()))


@torch.inference_mode()
def _serve(engine, conn, tp: TensorParallel) -> None:
    runner, hidden = engine.runner, None
    with tensor_parallel_group(tp.group, tp.small_all_reduce):
        while True:
            try:
                kind, payload = conn.recv()
            except EOFError:  # rank 0 is gone
                kind = "stop"
            if kind == "stop":
                runner.decode_graphs = None  # (before the group goes: they hold its communicator)
                gc.collect()
                return
            if kind == "step":
                args, kwargs, context = payload.unpack(runner)
                with set_forward_context(context):
                    hidden = runner.forward(*args, **kwargs)
            elif kind == "graph":  # a decode step the captured graphs cover
                input_ids, args, pending = payload
                fill = None
                if pending is not None:  # async scheduling: the tokens rank 0 sampled, broadcast or this rank's own
                    rows, src, n = pending
                    if n is None:  # (TP_OWN_TOKENS: the last replay's argmax, which this rank's graph computed too)
                        tokens = runner.decode_graphs.last_tokens
                    else:
                        tokens = torch.empty(n, dtype=torch.long, device=runner.device)
                        _broadcast_from_rank0(tokens, tp.group)
                    fill = (tokens, rows, src)
                hidden = runner.decode_graphs.run(input_ids, *args, fill=fill)
            elif kind == "logits":  # join the gather; only rank 0 samples
                ops.all_gather(runner.compute_logits(hidden, payload), -1)


# ---------------------------------------------------------------- the workers as Ray actors


def import_ray():
    try:
        import ray
    except ImportError as e:
        raise ImportError("distributed_executor_backend='ray' needs Ray, an optional extra: "
                          "pip install 'kiln[ray]'") from e
    return ray


def _launch_ray(config, n: int, backend: str) -> "TensorParallel":
    """Rank 0 with Ray: the workers are actors, one per bundle of a placement group (PACK: on as
    few machines as fit), joined to the group through a TCPStore at this node's IP."""
    ray = import_ray()
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    cuda = backend == "nccl"
    rank0_gpu = _physical_gpu() if cuda else None
    _start_ray(ray, rank0_gpu)
    bundle = {"CPU": 1.0, "GPU": 1.0} if cuda else {"CPU": 1.0}
    have = ray.cluster_resources()
    for resource, amount in bundle.items():
        if have.get(resource, 0) < amount * (n - 1):
            raise ValueError(f"tensor_parallel_size={n} with distributed_executor_backend='ray' needs {n - 1} worker "
                             f"actor(s) of {bundle} (rank 0 runs in this process); the Ray cluster has "
                             f"{have.get(resource, 0):g} {resource}")
    group = placement_group([dict(bundle) for _ in range(n - 1)], strategy="PACK")
    try:
        ray.get(group.ready(), timeout=START_TIMEOUT_S)
    except BaseException as e:
        remove_placement_group(group)
        if isinstance(e, ray.exceptions.GetTimeoutError):
            raise RuntimeError(f"the Ray cluster could not place {n - 1} tensor-parallel worker(s) of {bundle} within "
                               f"{START_TIMEOUT_S:.0f} s; it has {ray.available_resources()} free") from None
        raise
    # (from here on the group is removed, and the actors killed, when rank 0's TensorParallel goes)
    tp = TensorParallel(0, n, backend, None, release=functools.partial(_remove_group, group))
    try:
        host = ray.util.get_node_ip_address()
        tp.store = store = dist.TCPStore(host, 0, n, is_master=True, wait_for_workers=False, timeout=TIMEOUT)
        # max_concurrency=2: `put` calls land while `serve` runs
        actor_cls = ray.remote(num_cpus=1, num_gpus=1 if cuda else 0, max_concurrency=2)(RayWorker)
        for rank in range(1, n):
            tp.workers.append(_RayWorker(rank, actor_cls.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
                group, placement_group_bundle_index=rank - 1)).remote()))
        for worker in tp.workers:
            worker.expect_hello()
            if cuda and worker.node == (host, rank0_gpu):
                raise ValueError(f"Ray gave tensor-parallel worker {worker.rank} GPU {rank0_gpu} of {host}, the one "
                                 "rank 0 uses in this process: start the Ray cluster without that GPU (e.g. "
                                 "CUDA_VISIBLE_DEVICES=1,... ray start --head)")
        for worker in tp.workers:
            worker.serve_ref = worker.actor.serve.remote(config, worker.rank, n, host, store.port, backend)
        tp.group = _process_group(store, 0, n, backend)
    except BaseException:
        tp.shutdown("start failed")
        raise
    return tp


def _physical_gpu() -> str:
    """The GPU rank 0 uses (cuda:0 of this process), as CUDA_VISIBLE_DEVICES and Ray name it."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",")[0].strip() if visible else "0"


def _start_ray(ray, rank0_gpu: str | None) -> None:
    """A local Ray cluster when none is connected. Ray does not know of rank 0, which runs in this
    process: the cluster started here is given the other GPUs only."""
    if ray.is_initialized():
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if rank0_gpu is not None:
        ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(i.strip() for i in ids if i.strip() != rank0_gpu)
    try:
        ray.init(ignore_reinit_error=True)
    finally:
        if rank0_gpu is not None:
            if visible is None:
                del os.environ["CUDA_VISIBLE_DEVICES"]
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = visible


def _remove_group(group) -> None:
    ray = import_ray()
    if ray.is_initialized():
        from ray.util.placement_group import remove_placement_group

        with contextlib.suppress(Exception):
            remove_placement_group(group)


def _error_key(rank: int) -> str:
    return f"kiln-tp-error-{rank}"


class _RayWorker:
    """A worker actor, rank 0's side: the methods of _Worker. Messages go as numbered `put` calls;
    the actor's `serve` call is its life, so its result is how it ended (None: stopped; an error:
    it died); a traceback the worker caught comes through the store."""

    diagnose_s = RAY_DIAGNOSE_S

    def __init__(self, rank: int, actor):
        self.rank, self.actor = rank, actor
        self.serve_ref = None
        self.node: tuple[str, str | None] | None = None  # (IP, CUDA_VISIBLE_DEVICES), from its hello
        self.sent = 0

    def send(self, message) -> None:
        self.actor.put.remote(self.sent, message)
        self.sent += 1

    def is_alive(self) -> bool:
        ray = import_ray()
        return self.serve_ref is None or not ray.wait([self.serve_ref], timeout=0)[0]

    def failure(self, store) -> str | None:
        ray = import_ray()
        key = _error_key(self.rank)
        if store is not None and store.check([key]):
            return f"worker {self.rank} raised:\n{store.get(key).decode()}"
        if self.serve_ref is None or not ray.wait([self.serve_ref], timeout=0)[0]:
            return None
        try:
            ray.get(self.serve_ref)
        except ray.exceptions.RayActorError as e:
            detail = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            return f"worker {self.rank} (Ray actor {self.actor._actor_id.hex()[:12]}) died: {detail}"
        except ray.exceptions.RayTaskError as e:  # raised before it reached the store
            return f"worker {self.rank} raised:\n{e}"
        return f"worker {self.rank} stopped"

    def expect_hello(self) -> None:
        ray = import_ray()
        try:
            self.node = ray.get(self.actor.hello.remote(), timeout=START_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(f"tensor-parallel worker {self.rank} did not start within "
                               f"{START_TIMEOUT_S:.0f} s") from None
        except ray.exceptions.RayError as e:
            raise RuntimeError(f"tensor-parallel worker {self.rank} failed while starting:\n{e}") from None

    def request_stop(self) -> None:
        with contextlib.suppress(Exception):  # (a dead actor, or Ray already shut down)
            self.send(("stop", None))

    def join(self) -> None:
        ray = import_ray()
        if not ray.is_initialized():
            return
        with contextlib.suppress(Exception):
            if self.serve_ref is not None:
                ray.wait([self.serve_ref], timeout=5)
            ray.kill(self.actor)


class _Inbox:
    """A Ray worker's end of the step channel, shaped like the pipe `_worker_main` reads: rank 0's
    `put` calls, which a threaded actor may run out of order, handed out by number."""

    def __init__(self):
        self.ready = threading.Condition()
        self.messages: dict[int, object] = {}
        self.next = 0
        self.error: str | None = None  # the traceback the worker caught

    def put(self, seq: int, message) -> None:
        with self.ready:
            self.messages[seq] = message
            self.ready.notify()

    def recv(self):
        with self.ready:
            self.ready.wait_for(lambda: self.next in self.messages)
            self.next += 1
            return self.messages.pop(self.next - 1)

    def send(self, message) -> None:  # the worker's reports: the actor says hello itself
        kind, payload = message
        if kind == "error":
            self.error = payload


class RayWorker:
    """A tensor-parallel worker as a Ray actor (`ray.remote` is applied in `_launch_ray`, with
    its resources). `serve` runs `_worker_main`, the worker's whole life, as a process would."""

    def __init__(self):
        self.inbox = _Inbox()

    def hello(self) -> tuple[str, str | None]:
        import ray

        return ray.util.get_node_ip_address(), os.environ.get("CUDA_VISIBLE_DEVICES")

    def put(self, seq: int, message) -> None:
        self.inbox.put(seq, message)

    def serve(self, config, rank: int, world_size: int, host: str, port: int, backend: str) -> None:
        # Ray gives the actor its GPU as CUDA_VISIBLE_DEVICES: it is cuda:0 here
        _worker_main(self.inbox, config, rank, world_size, port, backend, host, cuda_index=0)
        if self.inbox.error is None:
            return
        try:  # report through rank 0's store, then exit as a worker process does: the group's connections close
            store = dist.TCPStore(host, port, world_size, is_master=False, timeout=datetime.timedelta(seconds=30))
            store.set(_error_key(rank), self.inbox.error)
        except Exception:  # noqa: BLE001 - no store: the call's own error carries the traceback
            raise RuntimeError(self.inbox.error) from None
        os._exit(1)
