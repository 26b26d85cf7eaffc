"""AsyncLLM: the engine's step loop on one background thread, requests in and out through asyncio.

`LLMEngine` is synchronous and not thread-safe, so one thread (`kiln-engine`) owns it: every
engine call (add_request, add_pooling_request, abort_request, step, and anything touching the
tokenizer) runs there. Callers submit closures through a thread-safe queue that the loop drains
between steps; outputs go back to each caller's event loop with `call_soon_threadsafe`.

    llm = AsyncLLM.from_config(EngineConfig(model=path))
    async for out in llm.generate("Hello", SamplingParams(max_tokens=8), "req-1"):
        print(out.outputs[0].text)   # cumulative; the last output has finished=True

A caller that stops iterating (a client disconnect cancels its task) aborts its request, and the
request's KV blocks are freed before the next step. A request that fails (bad input, or a model
step that raised) raises to its own caller; the loop goes on serving the others.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from kiln.runtime.score_templates import cross_encoder_prompts
from kiln.runtime.config import EngineConfig
from kiln.runtime.engine import LLMEngine
from kiln.runtime.outputs import PoolingRequestOutput, RequestOutput
from kiln.runtime.pooling_params import PoolingParams
from kiln.runtime.sampling_params import SamplingParams

logger = logging.getLogger("kiln")

_ACCEPTED = object()  # the engine took the request
_ABORTED = object()  # the request was aborted by id: its stream ends without a finished output
_STOP = object()  # ends the loop


class EngineOverloadedError(RuntimeError):
    """More requests in flight than `max_pending_requests` (HTTP 429)."""


class EngineDeadError(RuntimeError):
    """The engine loop has stopped (shut down, or crashed); no request can be served."""


@dataclass
class EngineStats:
    """A snapshot taken on the engine thread after each loop turn; safe to read from any thread."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float | None = None  # fraction of KV blocks in use; None for pooling models
    num_preemptions: int = 0
    num_unfinished: int = 0  # user requests the engine holds


@dataclass
class IterationStats:
    """What one loop turn produced, handed to each stat logger on the engine thread."""

    num_prompt_tokens: int = 0  # prompts that finished their prefill this turn (or were pooled)
    num_generation_tokens: int = 0
    time_to_first_token: list[float] = field(default_factory=list)  # seconds, one per request
    time_per_output_token: list[float] = field(default_factory=list)  # a finished request's mean decode time
    e2e_latency: list[float] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)  # one per request: "stop", "length", "abort", "error"


@dataclass
class _Tracked:
    """A request the loop serves, as the engine thread sees it."""

    stream: "RequestStream"
    arrival: float
    num_prompt_tokens: int
    pooling: bool
    first_token_time: float | None = None
    num_generation_tokens: int = 0


class RequestStream:
    """One request's outputs as an async iterator, on the event loop that submitted it. Each item
    is the request's latest cumulative output (when the consumer lags, the outputs in between are
    skipped: each one supersedes the last); iteration ends after the finished one."""

    def __init__(self, llm: "AsyncLLM", request_id: str, loop: asyncio.AbstractEventLoop):
        self.llm, self.request_id, self.loop = llm, request_id, loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished = False

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self):
        if self.finished:
            raise StopAsyncIteration
        item = await self.queue.get()
        while not self.queue.empty():
            item = self.queue.get_nowait()
        if item is _ABORTED:
            self._done()
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._done()
            raise item
        if item.finished:
            self._done()
        return item

    def abort(self) -> None:
        """Stop the request if it is still running; its KV blocks are freed before the next step."""
        if not self.finished:
            self._done()
            try:
                self.llm._submit(functools.partial(self.llm._abort, self))
            except EngineDeadError:
                pass  # nothing left to free

    def _done(self) -> None:
        if not self.finished:
            self.finished = True
            self.llm._release()


async def admitted(stream: RequestStream, submit: Callable[[], None]) -> RequestStream:
    """Hand a request to the engine side with `submit` and wait for its acceptance: the stream,
    or the engine's refusal raised (the stream then closed)."""
    try:
        submit()
        ack = await stream.queue.get()
    except BaseException:
        stream.abort()
        raise
    if isinstance(ack, BaseException):
        stream._done()
        raise ack
    return stream


class AsyncLLM:
    """An LLMEngine served from asyncio. `generate` / `encode` / `add_request` may be awaited from
    any event loop; `max_pending_requests` bounds the requests in flight (more raise
    EngineOverloadedError). `stats` is the engine's latest EngineStats snapshot."""

    def __init__(self, engine: LLMEngine, max_pending_requests: int | None = None):
        self.engine = engine
        self.max_pending_requests = max_pending_requests
        self.stats = EngineStats()
        # called on the engine thread after each loop turn that did something
        self.stat_loggers: list[Callable[[IterationStats, EngineStats], None]] = []
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._tracked: dict[str, _Tracked] = {}  # engine thread only
        self._iteration = IterationStats()
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._closed = False  # set (under _inbox_lock) when the loop has stopped taking commands
        self._inbox_lock = threading.Lock()
        self._failed_steps = 0
        self._thread = threading.Thread(target=self._run, name="kiln-engine", daemon=True)
        self._publish_stats()
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig, max_pending_requests: int | None = None,
                    data_parallel_size: int = 1) -> "AsyncLLM":
        """data_parallel_size > 1: that many engine replicas, each its own process, behind one front
        with this class's methods (runtime/async_data_parallel.py)."""
        if data_parallel_size < 1:
            raise ValueError(f"data_parallel_size must be >= 1, got {data_parallel_size}")
        if data_parallel_size > 1:
            from kiln.runtime.async_data_parallel import AsyncLLMReplicas

            return AsyncLLMReplicas(config, data_parallel_size, max_pending_requests)
        engine = LLMEngine(config)
        engine.freeze_gc_heap()
        return cls(engine, max_pending_requests)

    # ------------------------------------------------------------ what the model is (read-only)

    @property
    def is_pooling(self) -> bool:
        return self.engine.is_pooling

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.engine.tasks

    @property
    def architecture(self) -> str:
        return self.engine.architecture

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    # ------------------------------------------------------------ requests (any event loop)

    async def add_request(self, request_id: str, prompt, params: SamplingParams | PoolingParams) -> RequestStream:
        """Queue a request and wait until the engine has taken it: bad input raises here (ValueError),
        before any output. Iterate the returned stream for the outputs; `abort()` it to stop."""
        if not self.is_alive:
            raise EngineDeadError("the engine loop is not running")
        with self._pending_lock:
            if self.max_pending_requests is not None and self._pending >= self.max_pending_requests:
                raise EngineOverloadedError(f"{self._pending} requests are in flight, the limit is "
                                            f"max_pending_requests={self.max_pending_requests}; retry later")
            self._pending += 1
        stream = RequestStream(self, request_id, asyncio.get_running_loop())
        return await admitted(stream, lambda: self._submit(functools.partial(self._add, stream, prompt, params), stream))

    async def generate(self, prompt, sampling_params: SamplingParams, request_id: str) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs of one request, one per step it progressed; the last has finished=True.
        Stopping the iteration early (break, cancellation) aborts the request."""
        stream = await self.add_request(request_id, prompt, sampling_params)
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort()

    async def encode(self, prompt, pooling_params: PoolingParams, request_id: str) -> PoolingRequestOutput:
        """One pooling request's output (`pooling_params.task` picks embed/classify/score/...)."""
        stream = await self.add_request(request_id, prompt, pooling_params)
        try:
            async for out in stream:
                if out.finished:
                    return out
            raise EngineDeadError(f"request {request_id!r} ended without an output")
        finally:
            stream.abort()

    async def abort(self, request_id: str) -> None:
        """Abort a request by id (its own consumer sees its stream end without a finished output)."""
        self._submit(functools.partial(self._abort_id, request_id))

    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Run fn(engine) on the engine thread between steps and return its result (or raise its
        exception): for work that needs the tokenizer or other engine state."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def run() -> None:
            try:
                result, error = fn(self.engine), None
            except Exception as e:  # noqa: BLE001 - handed to the caller
                result, error = None, e
            loop.call_soon_threadsafe(_resolve, future, result, error)

        self._submit(run, future)
        return await future

    async def score(self, first: list[str], second: list[str], request_id: str,
                    truncate_prompt_tokens: int | None = None) -> list[tuple[float, int]]:
        """Relevance of each (first[i], second[i]) pair as `LLM.score` computes it: a cross-encoder
        scores the pair as one input, an embedding model gives the cosine of the two embeddings.
        -> [(score, prompt tokens used)]."""
        if len(first) != len(second) or not first:
            raise ValueError("score needs two non-empty lists of the same length")
        if "classify" in self.tasks:
            prompts = await self.call(lambda e: cross_encoder_prompts(e, first, second, truncate_prompt_tokens))
            params = PoolingParams(task="score")
            outs = await gather_or_cancel([self.encode(p, params, f"{request_id}-{i}") for i, p in enumerate(prompts)])
            return [(float(o.outputs.data.reshape(-1)[0]), len(o.prompt_token_ids)) for o in outs]
        if "embed" not in self.tasks:
            raise ValueError(f"{self.architecture} serves {'/'.join(self.tasks)}: score needs an embedding or a "
                             "cross-encoder model")
        params = PoolingParams(task="embed", truncate_prompt_tokens=truncate_prompt_tokens)
        texts = list(dict.fromkeys(first + second))  # a query scored against many documents is embedded once
        outs = await gather_or_cancel([self.encode(t, params, f"{request_id}-{i}") for i, t in enumerate(texts)])
        embedded = dict(zip(texts, outs))
        pairs = [(embedded[a], embedded[b]) for a, b in zip(first, second)]
        return [(float(torch.nn.functional.cosine_similarity(a.outputs.data, b.outputs.data, dim=-1)),
                 len(a.prompt_token_ids) + len(b.prompt_token_ids)) for a, b in pairs]

    def shutdown(self, timeout: float | None = 10.0) -> None:
        """Stop the loop; requests still in flight fail with EngineDeadError."""
        if self._thread.is_alive():
            try:
                self._submit(_STOP)
            except EngineDeadError:
                return
            self._thread.join(timeout)

    # ------------------------------------------------------------ the engine thread

    def _submit(self, command, owner: RequestStream | asyncio.Future | None = None) -> None:
        """Queue command() for the engine thread; `owner` is told if the loop stops before running it."""
        with self._inbox_lock:
            if self._closed:
                raise EngineDeadError("the engine loop has stopped")
            self._inbox.put((command, owner))

    def _release(self) -> None:
        with self._pending_lock:
            self._pending -= 1

    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                commands = []
                if not engine.has_unfinished_requests():
                    commands.append(self._inbox.get())  # idle: sleep until there is work
                while True:
                    try:
                        commands.append(self._inbox.get_nowait())
                    except queue.Empty:
                        break
                for command, _ in commands:
                    if command is _STOP:
                        return
                    command()
                if engine.has_unfinished_requests():
                    self._step()
                self._publish_stats()
        except BaseException as e:  # a bug in the loop itself: nothing can be served any more
            logger.exception("kiln: the engine loop died")
            self._fail_all(EngineDeadError(f"the engine loop died: {e!r}"))
            raise
        finally:
            self._fail_all(EngineDeadError("the engine loop has stopped"))

    def _add(self, stream: RequestStream, prompt, params) -> None:
        rid, engine = stream.request_id, self.engine
        try:
            if rid in self._tracked:
                raise ValueError(f"request id {rid!r} is already in use")
            if isinstance(params, PoolingParams):
                engine.add_pooling_request(rid, prompt, params)
            else:
                engine.add_request(rid, prompt, params)
        except Exception as e:  # noqa: BLE001 - bad input: the caller's error alone
            self._send(stream, e)
            return
        self._tracked[rid] = _Tracked(stream, time.monotonic(), len(engine.parents[rid].prompt_token_ids),
                                      isinstance(params, PoolingParams))
        self._send(stream, _ACCEPTED)

    def _abort(self, stream: RequestStream) -> None:
        tracked = self._tracked.get(stream.request_id)
        if tracked is not None and tracked.stream is stream:
            del self._tracked[stream.request_id]
            self.engine.abort_request(stream.request_id)
            self._iteration.finish_reasons.append("abort")

    def _abort_id(self, request_id: str) -> None:
        tracked = self._tracked.get(request_id)
        if tracked is not None:
            self._abort(tracked.stream)
            self._send(tracked.stream, _ABORTED)

    def _step(self) -> None:
        engine = self.engine
        try:
            outputs = engine.step()
        except Exception as e:  # noqa: BLE001
            # The engine dropped the step's requests: they fail, every other request goes on.
            logger.error("kiln: %s", e)
            self._failed_steps += 1
            dropped = [rid for rid in self._tracked if rid not in engine.parents]
            if not dropped and self._failed_steps >= 3:  # the same failure again and again: give up on all
                dropped = list(self._tracked)
                engine.abort_request(dropped)
            for rid in dropped:
                self._send(self._tracked.pop(rid).stream, RuntimeError(str(e)))
                self._iteration.finish_reasons.append("error")
            return
        self._failed_steps = 0
        now = time.monotonic()
        for out in outputs:
            tracked = self._tracked.get(out.request_id)
            if tracked is None:
                continue
            it = self._iteration
            if tracked.pooling:
                it.num_prompt_tokens += tracked.num_prompt_tokens
            else:
                produced = sum(len(c.token_ids) for c in out.outputs)
                if tracked.first_token_time is None and produced:
                    tracked.first_token_time = now
                    it.num_prompt_tokens += tracked.num_prompt_tokens
                    it.time_to_first_token.append(now - tracked.arrival)
                it.num_generation_tokens += produced - tracked.num_generation_tokens
                tracked.num_generation_tokens = produced
                for c in out.outputs:  # the engine keeps appending to these lists: hand over copies
                    if c.logprobs is not None:
                        c.logprobs = list(c.logprobs)
                if out.prompt_logprobs is not None:
                    out.prompt_logprobs = list(out.prompt_logprobs)
            if out.finished:
                del self._tracked[out.request_id]
                it.e2e_latency.append(now - tracked.arrival)
                if not tracked.pooling:
                    it.finish_reasons.append(out.outputs[0].finish_reason)
                    decoded = max(len(c.token_ids) for c in out.outputs) - 1
                    if decoded > 0:
                        it.time_per_output_token.append((now - tracked.first_token_time) / decoded)
                else:
                    it.finish_reasons.append("stop")
            self._send(tracked.stream, out)

    def _publish_stats(self) -> None:
        engine = self.engine
        scheduler = engine.scheduler
        block_manager = getattr(engine, "block_manager", None)
        stats = EngineStats(
            num_running=len(scheduler.running), num_waiting=len(scheduler.waiting),
            kv_cache_usage=block_manager.usage if block_manager is not None else None,
            num_preemptions=scheduler.num_preemptions, num_unfinished=len(engine.parents))
        it = self._iteration
        if it.num_prompt_tokens or it.num_generation_tokens or it.finish_reasons:
            self._iteration = IterationStats()
            for log in self.stat_loggers:
                try:
                    log(it, stats)
                except Exception:  # noqa: BLE001 - metrics never stop serving
                    logger.exception("kiln: stat logger failed")
        self.stats = stats  # last: whoever sees this snapshot also sees the loggers' counts

    def _send(self, stream: RequestStream, item) -> None:
        try:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
        except RuntimeError:  # the caller's event loop is closed: nobody is listening
            if isinstance(item, RequestOutput) and not item.finished:
                self._abort(stream)

    def _fail_all(self, error: BaseException) -> None:
        with self._inbox_lock:
            self._closed = True
        for tracked in list(self._tracked.values()):
            self._send(tracked.stream, error)
        self._tracked.clear()
        while True:  # commands submitted but never run
            try:
                _, owner = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(owner, RequestStream):
                self._send(owner, error)
            elif isinstance(owner, asyncio.Future):
                try:
                    owner.get_loop().call_soon_threadsafe(_resolve, owner, None, error)
                except RuntimeError:
                    pass  # its event loop is closed


def _resolve(future: asyncio.Future, result, error) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


async def gather_or_cancel(coros) -> list:
    """asyncio.gather that cancels the rest when one fails (or when the caller is cancelled)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
