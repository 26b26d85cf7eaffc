"""Data parallelism behind the server: M engine replicas, each its own process with an AsyncLLM,
behind one front in the server's process that the HTTP handlers use as they use an AsyncLLM.

    llm = AsyncLLM.from_config(EngineConfig(model=path), data_parallel_size=2)   # -> AsyncLLMReplicas
    async for out in llm.generate("Hello", SamplingParams(max_tokens=8), "req-1"): ...

The front tokenizes and validates prompts itself (`call` runs the handlers' engine functions on a
`PromptEngine`: replica 0's tokenizer and limits, without its model), sends each request to the
replica with the fewest requests in flight, and streams that replica's outputs back; an abort
(a client that disconnects) goes to the replica that holds the request. Each replica process
(spawned with torch.multiprocessing, on cuda:r when there are several GPUs) runs an AsyncLLM on
an event loop that reads the front's messages from its pipe:

    front -> replica: ("add", id, prompt, params), ("abort", id), ("stop",)
    replica -> front: ("accepted", id), ("output", id, output), ("end", id), ("error", id, exception),
                      ("stats", IterationStats, EngineStats) after each engine-loop turn that did something

With distributed_executor_backend="ray" each replica is a Ray actor instead (`RayAsyncReplica`,
placed by Ray on any machine of its cluster), running the same `_replica_main`: the front's
messages reach it as numbered actor calls, and its own come back through a long poll (`take`),
so the front sees a pipe-shaped channel and a process-shaped handle (`_RayChannel`, `_RayProcess`).

Metrics are the sum over the replicas: the front feeds its stat loggers every replica's
IterationStats, and `stats` sums the replicas' latest snapshots (the KV-cache usage is their
mean). A replica that dies fails every request in flight with EngineDeadError naming it, the
other replicas are stopped, and `is_alive` (the server's /health) turns false.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import functools
import logging
import os
import queue
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp

from kiln.runtime.async_engine import (_ABORTED, _ACCEPTED, AsyncLLM, admitted, EngineDeadError, EngineOverloadedError,
                                      EngineStats, IterationStats, RequestStream)
from kiln.runtime.config import EngineConfig
from kiln.runtime.data_parallel import (check_gpus, connect_ray, ray_actor_death, ray_replica_resources,
                                       shutdown_at_exit)
from kiln.runtime.engine import LLMEngine
from kiln.runtime.outputs import RequestOutput
from kiln.runtime.pooling_params import PoolingParams
from kiln.runtime.sampling_params import SamplingParams

logger = logging.getLogger("kiln")

# A replica's start (spawn, imports, loading the model) until it says ready.
START_TIMEOUT_S = 600.0


class PromptEngine(LLMEngine):
    """An engine's prompt side without its model, for the front: `prepare_prompts`, `tokenize`,
    the tokenizer, the limits and what the model is. Built from replica 0's engine and sent over."""

    def __init__(self, engine: LLMEngine):  # (LLMEngine.__init__ is not called: nothing to load)
        for name in ("config", "hf_config", "architecture", "tasks", "model_impl", "is_pooling", "max_model_len",
                     "vocab_size", "tokenizer", "eos_token_ids", "is_encoder_decoder"):
            setattr(self, name, getattr(engine, name))
        self.feature_extractor = getattr(engine, "feature_extractor", None)
        # what score_templates reads of the model
        self.model = _ModelFacts(getattr(engine.model, "num_labels", 1))

    def add_request(self, *args, **kwargs):
        raise RuntimeError("the front's PromptEngine serves no requests: the replicas do")

    add_pooling_request = step = add_request


@dataclasses.dataclass
class _ModelFacts:
    num_labels: int


# ---------------------------------------------------------------- a replica process


def _replica_main(conn, config: EngineConfig, rank: int, gpu: int) -> None:
    """A replica: build an AsyncLLM (on cuda:gpu, its first GPU, when the machine has it), say ready
    (replica 0 with its PromptEngine), then serve the front's messages until ("stop",) or the
    front is gone."""
    try:
        if config.device in ("auto", "cuda") and torch.cuda.is_available() and torch.cuda.device_count() > gpu:
            config = dataclasses.replace(config, device=f"cuda:{gpu}")
            torch.cuda.set_device(gpu)  # (kernels launch and CUDA graphs capture on the current device)
        llm = AsyncLLM.from_config(config)
        conn.send(("ready", PromptEngine(llm.engine) if rank == 0 else None))
    except BaseException:  # noqa: BLE001 - reported to the front, which raises it
        conn.send(("failed", traceback.format_exc()))
        return
    try:
        asyncio.run(_serve(conn, llm))
    finally:
        llm.shutdown()


async def _serve(conn, llm: AsyncLLM) -> None:
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue = asyncio.Queue()
    lock = threading.Lock()  # the event loop and the engine thread (stats) both send

    def send(message) -> None:
        with lock:
            conn.send(message)

    def read() -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):  # the front is gone
                message = ("stop",)
            loop.call_soon_threadsafe(inbox.put_nowait, message)
            if message[0] == "stop":
                return

    threading.Thread(target=read, name="kiln-replica-inbox", daemon=True).start()
    llm.stat_loggers.append(lambda it, stats: send(("stats", it, stats)))
    running: dict[str, asyncio.Task] = {}

    async def run(request_id: str, prompt, params) -> None:
        try:
            stream = await llm.add_request(request_id, prompt, params)
        except Exception as e:  # noqa: BLE001 - bad input: the request's error alone
            send(("error", request_id, _portable(e)))
            return
        send(("accepted", request_id))
        try:
            out = None
            async for out in stream:
                send(("output", request_id, out))
            if out is None or not out.finished:
                send(("end", request_id))
        except Exception as e:  # noqa: BLE001
            send(("error", request_id, _portable(e)))
        finally:
            stream.abort()

    def forget(request_id: str, task: asyncio.Task) -> None:
        if running.get(request_id) is task:  # (not a later request that reused the id)
            del running[request_id]

    while True:
        message = await inbox.get()
        kind = message[0]
        if kind == "stop":
            break
        if kind == "add":
            task = running[message[1]] = asyncio.ensure_future(run(*message[1:]))
            task.add_done_callback(functools.partial(forget, message[1]))
        elif kind == "abort" and message[1] in running:
            running.pop(message[1]).cancel()  # (its stream aborts the request on the engine thread)
    for task in running.values():
        task.cancel()
    await asyncio.gather(*running.values(), return_exceptions=True)


def _portable(e: Exception) -> Exception:
    """An exception that unpickles in the front as the same kind: the server maps ValueError to
    400, EngineOverloadedError to 429, EngineDeadError to 503, the rest to 500."""
    for kind in (EngineOverloadedError, EngineDeadError, ValueError):
        if isinstance(e, kind):
            return kind(str(e))
    return RuntimeError(str(e))


# ---------------------------------------------------------------- a replica as a Ray actor

_CLOSED = "kiln-replica-closed"  # the last item a Ray replica's outbox holds: its channel's end


class RayAsyncReplica:
    """A replica as a Ray actor (`ray.remote` is applied by the front, with its resources and
    enough concurrency for `serve`, `put` and `take` at once). `serve` is its life: it runs
    `_replica_main` with the actor as the pipe's replica end."""

    def __init__(self):
        self.inbox: dict[int, Any] = {}  # the front's numbered messages (a threaded actor may run puts out of order)
        self.next = 0
        self.ready = threading.Condition()
        self.outbox: queue.Queue = queue.Queue()

    def hello(self) -> tuple[str, int]:
        import ray

        return ray.util.get_node_ip_address(), os.getpid()

    def put(self, seq: int, message) -> None:
        with self.ready:
            self.inbox[seq] = message
            self.ready.notify()

    def take(self, timeout: float) -> list:
        """The replica's messages to the front: what is there, after waiting up to `timeout` for one."""
        try:
            items = [self.outbox.get(timeout=timeout)]
        except queue.Empty:
            return []
        while True:
            try:
                items.append(self.outbox.get_nowait())
            except queue.Empty:
                return items

    def serve(self, config: EngineConfig, rank: int) -> None:
        try:
            _replica_main(self, config, rank, 0)  # (Ray gives the actor its GPU as cuda:0)
        finally:
            self.outbox.put(_CLOSED)

    # the pipe's replica end, as _replica_main and _serve use it
    def send(self, message) -> None:
        self.outbox.put(message)

    def recv(self):
        with self.ready:
            self.ready.wait_for(lambda: self.next in self.inbox)
            self.next += 1
            return self.inbox.pop(self.next - 1)


class _RayChannel:
    """The front's end of a Ray replica's channel, shaped like a pipe's: `send` numbers each message
    (its sender holds the replica's lock), `recv` and `poll` read the replica's outbox through
    `take`. A dead actor, or one whose `serve` returned, reads as a closed pipe (EOFError)."""

    def __init__(self, ray, actor):
        self.ray, self.actor = ray, actor
        self.sent = 0
        self.buffer: collections.deque = collections.deque()

    def send(self, message) -> None:
        self.actor.put.remote(self.sent, message)
        self.sent += 1

    def poll(self, timeout: float) -> bool:
        if not self.buffer:
            self._fill(timeout)
        return bool(self.buffer)

    def recv(self):
        while not self.buffer:
            self._fill(1.0)
        item = self.buffer.popleft()
        if isinstance(item, str) and item == _CLOSED:
            self.buffer.appendleft(item)
            raise EOFError("the replica's channel is closed")
        return item

    def _fill(self, timeout: float) -> None:
        try:
            self.buffer.extend(self.ray.get(self.actor.take.remote(timeout)))
        except self.ray.exceptions.RayActorError:
            self.buffer.append(_CLOSED)


class _RayProcess:
    """A Ray replica's handle, shaped like the multiprocessing.Process the front keeps for a
    replica process: alive while its `serve` call runs."""

    daemon = True

    def __init__(self, ray, actor, serve_ref, node: str, pid: int):
        self.ray, self.actor, self.serve_ref = ray, actor, serve_ref
        self.node, self.pid = node, pid

    def is_alive(self) -> bool:
        return not self.ray.wait([self.serve_ref], timeout=0)[0]

    def join(self, timeout: float | None = None) -> None:
        self.ray.wait([self.serve_ref], timeout=timeout)

    def terminate(self) -> None:
        self.ray.kill(self.actor)

    def death(self) -> str:
        return f"Ray actor on {self.node}, pid {self.pid}: {ray_actor_death(self.ray, self.serve_ref)}"


def _start_ray_replicas(config: EngineConfig, size: int) -> list:
    """`size` replica actors, each serving: the front's (channel, process-shaped handle) pairs."""
    ray = connect_ray()
    resources = ray_replica_resources(ray, size, config.tensor_parallel_size, str(config.device))
    actor_cls = ray.remote(max_concurrency=4, **resources)(RayAsyncReplica)
    actors = [actor_cls.remote() for _ in range(size)]
    try:
        nodes = ray.get([actor.hello.remote() for actor in actors], timeout=START_TIMEOUT_S)
    except BaseException:
        for actor in actors:
            ray.kill(actor)
        raise
    return [(_RayChannel(ray, actor), _RayProcess(ray, actor, actor.serve.remote(config, rank), *node))
            for rank, (actor, node) in enumerate(zip(actors, nodes))]


# ---------------------------------------------------------------- the front


@dataclasses.dataclass
class _Replica:
    rank: int
    conn: Any  # the front's end of the replica's pipe
    process: mp.Process
    in_flight: int = 0  # requests sent and not finished: the load it is balanced by
    num_requests: int = 0  # requests sent, in all
    stats: EngineStats = dataclasses.field(default_factory=EngineStats)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)  # the front's sends

    def send(self, message) -> None:
        with self.lock:
            self.conn.send(message)


class _ReplicaStream(RequestStream):
    """A request's outputs from the replica that serves it."""

    def __init__(self, llm: "AsyncLLMReplicas", request_id: str, loop, replica: _Replica):
        super().__init__(llm, request_id, loop)
        self.replica = replica

    def _done(self) -> None:
        if not self.finished:
            super()._done()
            self.llm._forget(self)


class AsyncLLMReplicas:
    """`data_parallel_size` AsyncLLMs, each in its own process, served as one: the methods and
    properties of AsyncLLM that the server uses. Requests go to the replica with the fewest in
    flight; `max_pending_requests` bounds the requests in flight over all replicas."""

    # the same request logic as one engine's: add_request and the stream are this class's
    generate = AsyncLLM.generate
    encode = AsyncLLM.encode
    score = AsyncLLM.score

    def __init__(self, config: EngineConfig, data_parallel_size: int, max_pending_requests: int | None = None):
        if data_parallel_size < 1:
            raise ValueError(f"data_parallel_size must be >= 1, got {data_parallel_size}")
        self.max_pending_requests = max_pending_requests
        self.stat_loggers: list[Callable[[IterationStats, EngineStats], None]] = []
        self._lock = threading.Lock()  # routing: the streams, the loads, the pending count
        self._streams: dict[str, _ReplicaStream] = {}
        self._pending = 0
        self._stats_lock = threading.Lock()
        self._dead: str | None = None  # why the replicas were stopped
        self._stopping = threading.Lock()  # (a reader that saw its replica die and shutdown may both stop them)
        self._prompts = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kiln-prompts")
        self.replicas: list[_Replica] = []
        if config.distributed_executor_backend == "ray":
            self.replicas = [_Replica(rank, channel, handle)
                             for rank, (channel, handle) in enumerate(_start_ray_replicas(config, data_parallel_size))]
        else:
            self._start_processes(config, data_parallel_size)
        try:
            self.engine: PromptEngine = [self._expect_ready(r) for r in self.replicas][0]
        except BaseException:
            self._dead = "start failed"
            self._stop_replicas()
            raise
        self._readers = [threading.Thread(target=self._read, args=(r,), name=f"kiln-replica-{r.rank}-reader",
                                          daemon=True) for r in self.replicas]
        for reader in self._readers:
            reader.start()

    def _start_processes(self, config: EngineConfig, size: int) -> None:
        tp = config.tensor_parallel_size
        check_gpus(size, tp)
        context = mp.get_context("spawn")
        if tp > 1:  # (replicas that start workers are not daemons)
            shutdown_at_exit(self)
        for rank in range(size):
            parent, child = context.Pipe()
            process = context.Process(target=_replica_main, args=(child, config, rank, rank * tp), daemon=tp == 1,
                                      name=f"kiln-replica-{rank}")
            process.start()
            child.close()
            self.replicas.append(_Replica(rank, parent, process))

    def _expect_ready(self, replica: _Replica):
        deadline = time.monotonic() + START_TIMEOUT_S
        while not replica.conn.poll(0.1):
            if time.monotonic() > deadline:
                raise RuntimeError(f"data-parallel replica {replica.rank} did not start within {START_TIMEOUT_S:.0f} s")
        try:
            kind, payload = replica.conn.recv()
        except (EOFError, OSError):
            replica.process.join(timeout=5)
            raise RuntimeError(f"data-parallel replica {replica.rank} died while starting "
                               f"({self._exit(replica)})") from None
        if kind != "ready":
            raise RuntimeError(f"data-parallel replica {replica.rank} failed while starting:\n{payload}")
        return payload

    # ------------------------------------------------------------ what the model is (read-only)

    # read from self.engine, replica 0's PromptEngine, as AsyncLLM reads them from its engine
    is_pooling = AsyncLLM.is_pooling
    tasks = AsyncLLM.tasks
    architecture = AsyncLLM.architecture
    max_model_len = AsyncLLM.max_model_len

    @property
    def data_parallel_size(self) -> int:
        return len(self.replicas)

    @property
    def is_alive(self) -> bool:
        return self._dead is None and all(r.process.is_alive() for r in self.replicas)

    @property
    def stats(self) -> EngineStats:
        """The replicas' latest snapshots, summed (the KV-cache usage is their mean)."""
        snapshots = [r.stats for r in self.replicas]
        usage = [s.kv_cache_usage for s in snapshots if s.kv_cache_usage is not None]
        return EngineStats(num_running=sum(s.num_running for s in snapshots),
                           num_waiting=sum(s.num_waiting for s in snapshots),
                           kv_cache_usage=sum(usage) / len(usage) if usage else None,
                           num_preemptions=sum(s.num_preemptions for s in snapshots),
                           num_unfinished=sum(s.num_unfinished for s in snapshots))

    # ------------------------------------------------------------ requests (any event loop)

    async def add_request(self, request_id: str, prompt, params: SamplingParams | PoolingParams) -> RequestStream:
        """Send a request to the least loaded replica and wait until it has taken it: bad input
        raises here (ValueError), before any output."""
        if not self.is_alive:
            raise EngineDeadError(self._why_dead())
        with self._lock:
            if self.max_pending_requests is not None and self._pending >= self.max_pending_requests:
                raise EngineOverloadedError(f"{self._pending} requests are in flight, the limit is "
                                            f"max_pending_requests={self.max_pending_requests}; retry later")
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            replica = min(self.replicas, key=lambda r: r.in_flight)
            stream = _ReplicaStream(self, request_id, asyncio.get_running_loop(), replica)
            self._streams[request_id] = stream
            self._pending += 1
            replica.in_flight += 1
            replica.num_requests += 1
        return await admitted(stream, lambda: self._submit(functools.partial(replica.send, ("add", request_id, prompt,
                                                                                     params))))

    async def abort(self, request_id: str) -> None:
        """Abort a request by id (its own consumer sees its stream end without a finished output)."""
        stream = self._streams.get(request_id)
        if stream is not None:
            self._abort(stream)
            self._deliver(stream, _ABORTED)

    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """fn(engine) on the front's PromptEngine (tokenizer, limits; no model), on one thread."""
        if not self.is_alive:
            raise EngineDeadError(self._why_dead())
        return await asyncio.get_running_loop().run_in_executor(self._prompts, fn, self.engine)

    def shutdown(self, timeout: float | None = 10.0) -> None:
        """Stop the replicas; requests still in flight fail with EngineDeadError."""
        if self._dead is None:
            self._dead = "the data-parallel replicas are shut down"
        self._stop_replicas(timeout)
        self._fail_all(EngineDeadError(self._dead))
        self._prompts.shutdown(wait=False)

    def _why_dead(self) -> str:
        if self._dead is not None:
            return self._dead
        dead = [r for r in self.replicas if not r.process.is_alive()]
        return self._death(dead[0]) if dead else "the data-parallel replicas are not running"

    @staticmethod
    def _death(replica: _Replica) -> str:
        # its pipe can close before the process is reaped: wait for the exit code. Another thread
        # (a /health check) may be reaping it at the same moment, and then this one's poll sees no
        # child and no code yet: hence the loop
        if isinstance(replica.process, _RayProcess):
            return (f"data-parallel replica {replica.rank} ({replica.process.death()}) died; the other replicas "
                    "have been shut down")
        deadline = time.monotonic() + 5
        while replica.process.exitcode is None and time.monotonic() < deadline:
            replica.process.join(timeout=0.05)
        return (f"data-parallel replica {replica.rank} (pid {replica.process.pid}) died, exit code "
                f"{replica.process.exitcode}; the other replicas have been shut down")

    @staticmethod
    def _exit(replica: _Replica) -> str:
        if isinstance(replica.process, _RayProcess):
            return replica.process.death()
        return f"exit code {replica.process.exitcode}"

    # ------------------------------------------------------------ what RequestStream calls

    def _submit(self, command, owner=None) -> None:
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        try:
            command()
        except (BrokenPipeError, OSError) as e:
            raise EngineDeadError(f"a data-parallel replica is gone ({e})") from None

    def _abort(self, stream: _ReplicaStream) -> None:
        try:
            stream.replica.send(("abort", stream.request_id))
        except (BrokenPipeError, OSError):
            pass  # the replica is gone, and its requests with it

    def _release(self) -> None:
        pass  # (the count is kept by _forget, which knows the replica)

    def _forget(self, stream: _ReplicaStream) -> None:
        with self._lock:
            if self._streams.get(stream.request_id) is stream:
                del self._streams[stream.request_id]
            self._pending -= 1
            stream.replica.in_flight -= 1

    # ------------------------------------------------------------ the readers (one thread per replica)

    def _read(self, replica: _Replica) -> None:
        items = {"accepted": lambda m: _ACCEPTED, "output": lambda m: m[2], "end": lambda m: _ABORTED,
                 "error": lambda m: m[2]}
        while True:
            try:
                message = replica.conn.recv()
            except (EOFError, OSError):
                break
            if message[0] == "stats":
                self._record(replica, message[1], message[2])
                continue
            stream = self._streams.get(message[1])
            if stream is not None and stream.replica is replica:
                self._deliver(stream, items[message[0]](message))
        if self._dead is None:  # not stopped by the front: the replica died
            replica.process.join(timeout=5)
            self._dead = self._death(replica)
            logger.error("kiln: %s", self._dead)
            self._fail_all(EngineDeadError(self._dead))
            self._stop_replicas()

    def _deliver(self, stream: _ReplicaStream, item) -> None:
        try:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
        except RuntimeError:  # the caller's event loop is closed: nobody is listening
            if isinstance(item, RequestOutput) and not item.finished:
                self._abort(stream)

    def _record(self, replica: _Replica, it: IterationStats, stats: EngineStats) -> None:
        with self._stats_lock:  # (the loggers are not thread-safe; each reader is a thread)
            replica.stats = stats
            total = self.stats
            for log in self.stat_loggers:
                try:
                    log(it, total)
                except Exception:  # noqa: BLE001 - metrics never stop serving
                    logger.exception("kiln: stat logger failed")

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            streams = list(self._streams.values())
        for stream in streams:
            self._deliver(stream, error)

    def _stop_replicas(self, timeout: float | None = 10.0) -> None:
        with self._stopping:  # (two threads joining one process may both miss its exit)
            for replica in self.replicas:
                try:
                    replica.send(("stop",))
                except (BrokenPipeError, OSError):
                    pass
            for replica in self.replicas:
                replica.process.join(timeout)
                if replica.process.is_alive():
                    replica.process.terminate()
                    replica.process.join(5)
                elif isinstance(replica.process, _RayProcess):
                    replica.process.terminate()  # (an actor outlives its `serve` call: free its resources)
