"""Data parallelism: M engine replicas, each its own process (started with torch.multiprocessing,
each on its own GPU when there are several), behind one `LLM`. With tensor_parallel_size=N each
replica is a tensor-parallel engine: replica r is rank 0 of its own group on GPUs rN..rN+N-1 and
starts its N-1 workers itself.

With distributed_executor_backend="ray" the replicas are Ray actors instead (`RayReplicaPool`),
one GPU each (or one CPU), placed by Ray on any machine of its cluster; a tensor-parallel
replica's workers are then Ray actors too, started by the replica as a single engine starts them.

A call's prompts are split across the replicas by load (greedy: the next prompt goes to the
replica with the fewest estimated tokens so far), each replica runs its share as an ordinary
`LLM` call, and the outputs come back in the caller's order. A replica that dies fails the call
with an error naming it, and the pool shuts down instead of hanging.
"""

from __future__ import annotations

import atexit
import contextlib
import traceback
import weakref
from typing import Any

import torch
import torch.multiprocessing as mp


def check_gpus(size: int, tp: int) -> None:
    """ValueError unless the machine has a GPU for each replica (for each rank of each, under
    tensor parallelism): replica r then runs on cuda:r*tp. Replicas without TP share a lone GPU."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count and (count > 1 or tp > 1) and count < size * tp:
        layout = f"data_parallel_size={size}" + (f" x tensor_parallel_size={tp}" if tp > 1 else "")
        raise ValueError(f"{layout} needs {size * tp} GPUs; this machine has {count}")


def shutdown_at_exit(pool) -> None:
    """Replicas that start tensor-parallel workers cannot be daemon processes (those may not have
    children). Stop them at exit before multiprocessing joins its non-daemon children (atexit runs
    the last registered first), else that join would wait on replicas that still wait for work."""
    atexit.register(_shutdown_if_alive, weakref.ref(pool))


def make_pool(size: int, llm_kwargs: dict) -> "ReplicaPool":
    """The replicas: Ray actors with distributed_executor_backend="ray", else processes."""
    if llm_kwargs.get("distributed_executor_backend") == "ray":
        return RayReplicaPool(size, llm_kwargs)
    return ReplicaPool(size, llm_kwargs)


def _call(llm, message) -> tuple:
    """A replica's answer to ("call", method, args, kwargs): ("ok", result) or ("error", (the
    exception, its traceback))."""
    _, method, args, kwargs = message
    try:
        return "ok", getattr(llm, method)(*args, **kwargs)
    except BaseException as e:  # noqa: BLE001 - reported to the caller, which raises it
        return "error", (e, traceback.format_exc())


def _replica_main(conn, llm_kwargs: dict, gpu: int) -> None:
    """A replica: build an LLM (on cuda:gpu, its first GPU, when the machine has it), then serve
    ("call", method, args, kwargs) until ("stop",)."""
    from kiln.runtime.llm import LLM

    try:
        if torch.cuda.is_available() and torch.cuda.device_count() > gpu:
            llm_kwargs = {**llm_kwargs, "device": f"cuda:{gpu}"}
            torch.cuda.set_device(gpu)  # (kernels launch and CUDA graphs capture on the current device)
        llm = LLM(**llm_kwargs)
        conn.send(("ready", None))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", (e, traceback.format_exc())))
        return
    while True:
        try:
            message = conn.recv()
        except EOFError:
            message = ("stop",)
        if message[0] == "stop":
            llm.shutdown()  # (a tensor-parallel replica's workers)
            return
        conn.send(_call(llm, message))


class ReplicaPool:
    def __init__(self, size: int, llm_kwargs: dict):
        if size < 2:
            raise ValueError(f"data_parallel_size must be >= 2 for a replica pool, got {size}")
        tp = llm_kwargs.get("tensor_parallel_size", 1)
        check_gpus(size, tp)
        context = mp.get_context("spawn")
        self.replicas = []
        daemon = tp == 1
        if not daemon:
            shutdown_at_exit(self)
        for rank in range(size):
            parent, child = context.Pipe()
            process = context.Process(target=_replica_main, args=(child, llm_kwargs, rank * tp), daemon=daemon,
                                      name=f"kiln-replica-{rank}")
            process.start()
            child.close()
            self.replicas.append((parent, process))
        try:
            for rank in range(size):
                self._receive(rank)
        except BaseException:
            self.shutdown()
            raise

    @property
    def size(self) -> int:
        return len(self.replicas)

    def call(self, method: str, prompts: list, per_prompt: list | None, loads: list[float], **kwargs) -> list:
        """Run `method(prompts_share, per_prompt_share, **kwargs)` on every replica, sharded by load;
        outputs in the caller's order."""
        shares: list[list[int]] = [[] for _ in self.replicas]
        totals = [0.0] * self.size
        for i in sorted(range(len(prompts)), key=lambda i: -loads[i]):  # biggest first, to the least loaded
            r = min(range(self.size), key=totals.__getitem__)
            shares[r].append(i)
            totals[r] += loads[i]
        busy = []
        for r, idx in enumerate(shares):
            if not idx:
                continue
            args = ([prompts[i] for i in idx],) + (([per_prompt[i] for i in idx],) if per_prompt is not None else ())
            self._send(r, ("call", method, args, kwargs))
            busy.append(r)
        results: list[Any] = [None] * len(prompts)
        error = None
        for r in busy:
            try:
                for i, out in zip(shares[r], self._receive(r)):
                    results[i] = out
            except BaseException as e:  # noqa: BLE001 - collect the others' answers before raising
                error = error or e
        if error is not None:
            raise error
        return results

    def ask(self, method: str, *args, **kwargs):
        """`method(*args, **kwargs)` of replica 0's LLM (what every replica would answer alike)."""
        self._send(0, ("call", method, args, kwargs))
        return self._receive(0)

    def apply(self, func) -> list:
        """func(model) on every replica (func must pickle: a module-level function)."""
        out = []
        for r in range(self.size):
            self._send(r, ("call", "apply_model", (func,), {}))
            out += self._receive(r)
        return out

    def _send(self, rank: int, message) -> None:
        try:
            self.replicas[rank][0].send(message)
        except (BrokenPipeError, OSError) as e:
            self.shutdown()
            raise RuntimeError(f"data-parallel replica {rank} is gone ({e}); the pool has been shut down") from None

    def _receive(self, rank: int):
        conn, process = self.replicas[rank]
        try:
            status, payload = conn.recv()
        except (EOFError, OSError):
            code = process.exitcode
            self.shutdown()
            raise RuntimeError(f"data-parallel replica {rank} died (exit code {code}); the pool has been shut down") from None
        return _answer(rank, status, payload)

    def shutdown(self) -> None:
        for conn, process in self.replicas:
            try:
                conn.send(("stop",))
            except (BrokenPipeError, OSError):
                pass
        for conn, process in self.replicas:
            process.join(timeout=30)  # (a tensor-parallel replica stops its workers first)
            if process.is_alive():
                process.terminate()
            conn.close()
        self.replicas = []


def _answer(rank: int, status: str, payload):
    """A replica's answer -> its result, or the error it reports raised here."""
    if status == "error":
        error, trace = payload
        if isinstance(error, (ValueError, FileNotFoundError, OSError)):
            raise error  # bad input: the same exception a single engine raises
        raise RuntimeError(f"data-parallel replica {rank} failed:\n{trace}") from error
    return payload


def connect_ray():
    """Ray, connected to the cluster this process knows (or a local one started here)."""
    from kiln.runtime.tensor_parallel import import_ray

    ray = import_ray()
    if not ray.is_initialized():
        ray.init(ignore_reinit_error=True)
    return ray


def ray_replica_resources(ray, size: int, tp: int, device: str) -> dict:
    """A replica actor's resources: one GPU where the cluster has GPUs and the model is not asked
    onto the CPU, else one CPU. ValueError when the cluster lacks them for `size` replicas (and
    their tensor-parallel workers, one of the same each)."""
    have = ray.cluster_resources()
    gpu = device != "cpu" and have.get("GPU", 0) > 0
    resource, need = ("GPU" if gpu else "CPU"), size * tp
    if have.get(resource, 0) < need:
        layout = f"data_parallel_size={size}" + (f" x tensor_parallel_size={tp}" if tp > 1 else "")
        raise ValueError(f"{layout} with distributed_executor_backend='ray' needs {need:g} {resource} in the Ray "
                         f"cluster (one per replica{', and per worker' if tp > 1 else ''}); it has "
                         f"{have.get(resource, 0):g}")
    return {"num_cpus": 0, "num_gpus": 1} if gpu else {"num_cpus": 1, "num_gpus": 0}


def ray_actor_death(ray, ref) -> str:
    """Why the actor whose call `ref` is has died: the last line of Ray's error."""
    try:
        ray.get(ref, timeout=0)
    except ray.exceptions.RayActorError as e:
        return str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return "it stopped"


class RayReplica:
    """A replica as a Ray actor (`ray.remote` is applied in RayReplicaPool, with its resources):
    an LLM built by `start`, answering `handle` calls as a replica process answers its pipe."""

    def __init__(self):
        self.llm = None

    def start(self, llm_kwargs: dict) -> tuple:
        import ray

        from kiln.runtime.llm import LLM

        try:
            self.llm = LLM(**llm_kwargs)
        except BaseException as e:  # noqa: BLE001 - reported to the pool, which raises it
            return "error", (e, traceback.format_exc())
        return "ready", ray.util.get_node_ip_address()

    def handle(self, message) -> tuple:
        return _call(self.llm, message)

    def stop(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()  # (a tensor-parallel replica's worker actors)
            self.llm = None


class RayReplicaPool(ReplicaPool):
    """The replicas as Ray actors, on whichever machines of the Ray cluster have the resources:
    one GPU each when the cluster has GPUs and the model is not asked onto the CPU, else one CPU.
    (A tensor-parallel replica asks the cluster for its other ranks itself.) The process joins
    the cluster it is connected to, or starts a local one."""

    def __init__(self, size: int, llm_kwargs: dict):
        if size < 2:
            raise ValueError(f"data_parallel_size must be >= 2 for a replica pool, got {size}")
        from kiln.runtime.tensor_parallel import START_TIMEOUT_S

        ray = self.ray = connect_ray()
        resources = ray_replica_resources(ray, size, llm_kwargs.get("tensor_parallel_size", 1),
                                          str(llm_kwargs.get("device", "auto")))
        actor_cls = ray.remote(**resources)(RayReplica)
        self.replicas = [actor_cls.remote() for _ in range(size)]
        self.pending: dict[int, object] = {}
        self.nodes: list[str] = []
        starts = [actor.start.remote(llm_kwargs) for actor in self.replicas]
        try:
            for rank, ref in enumerate(starts):
                self.pending[rank] = ref
                self.nodes.append(self._receive(rank, START_TIMEOUT_S))
        except BaseException:
            self.shutdown()
            raise

    def _send(self, rank: int, message) -> None:
        self.pending[rank] = self.replicas[rank].handle.remote(message)

    def _receive(self, rank: int, timeout: float | None = None):
        ray, ref = self.ray, self.pending.pop(rank, None)
        if ref is None:  # (shut down by another replica's failure in the same call)
            raise RuntimeError(f"data-parallel replica {rank}: the pool has been shut down")
        try:
            status, payload = ray.get(ref, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            self.shutdown()
            raise RuntimeError(f"data-parallel replica {rank} (a Ray actor) did not start within {timeout:.0f} s; "
                               f"the cluster has {ray.available_resources()} free") from None
        except ray.exceptions.RayActorError:
            self.shutdown()
            raise RuntimeError(f"data-parallel replica {rank} (a Ray actor) died: {ray_actor_death(ray, ref)}; "
                               "the pool has been shut down") from None
        return _answer(rank, status, payload)

    def shutdown(self) -> None:
        ray = self.ray
        if self.replicas and ray.is_initialized():
            stops = [actor.stop.remote() for actor in self.replicas]
            with contextlib.suppress(Exception):  # (dead actors)
                ray.wait(stops, num_returns=len(stops), timeout=30)
            for actor in self.replicas:
                with contextlib.suppress(Exception):
                    ray.kill(actor)
        self.replicas, self.pending = [], {}


def _shutdown_if_alive(ref) -> None:
    pool = ref()
    if pool is not None:
        pool.shutdown()
