"""Data parallelism behind the server: two replica processes behind one uvicorn server (as
test_server.py starts them), talked to with the official `openai` client. Concurrent completions,
streamed and not, are each answered once, with one engine's greedy text, and spread over both
replicas; a stream the client abandons is aborted on the replica that holds it; /metrics sums the
replicas; a replica that dies turns /health and the requests to 503; a bad size is a clear error."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from kiln import LLM  # noqa: E402
from kiln.runtime.async_engine import AsyncLLM  # noqa: E402
from kiln.runtime.cli import main  # noqa: E402
from kiln.runtime.config import EngineConfig  # noqa: E402
from kiln.runtime.server import build_app  # noqa: E402

KEY = "test-key"
PROMPTS = ["Hello, my name is", "The capital of France is", "Once upon a time there was a small engine",
           "Paged attention keeps keys and values", "Data parallelism runs replicas", "Two engines answer"]


class Server:
    """A uvicorn server for one AsyncLLM (or its replicas), on a free port, in a daemon thread."""

    def __init__(self, llm, name: str = "tiny-llama"):
        self.llm = llm
        app = build_app(llm, name, api_key=KEY)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, timeout=60)

    def aclient(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, timeout=60)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.llm.shutdown()

    def metric(self, name: str, **labels) -> float:
        for line in httpx.get(f"{self.url}/metrics").text.splitlines():
            if line and not line.startswith("#"):
                key, value = line.rsplit(" ", 1)
                if key.split("{")[0] == name and all(f'{k}="{v}"' in key for k, v in labels.items()):
                    return float(value)
        return 0.0


@pytest.fixture(scope="module")
def config(llama_path):
    return EngineConfig(model=llama_path, max_model_len=512)


@pytest.fixture(scope="module")
def dp(config):
    """DP=2 behind one server, for the module; the last test kills a replica."""
    server = Server(AsyncLLM.from_config(config, data_parallel_size=2))
    yield server
    server.stop()
    assert not any(r.process.is_alive() for r in server.llm.replicas)


@pytest.fixture(scope="module")
def single(config):
    server = Server(AsyncLLM.from_config(config))
    yield server
    server.stop()


async def _completions(server: Server, stream: bool, max_tokens: int = 8) -> list[tuple[str, str, str]]:
    """(id, text, finish reason) of one completion per prompt, all sent at once."""
    client = server.aclient()

    async def one(prompt: str):
        kwargs = dict(model="tiny-llama", prompt=prompt, max_tokens=max_tokens, temperature=0,
                      extra_body={"ignore_eos": True})
        if not stream:
            out = await client.completions.create(**kwargs)
            return out.id, out.choices[0].text, out.choices[0].finish_reason
        chunks = [c async for c in await client.completions.create(**kwargs, stream=True)]
        return chunks[0].id, "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason

    try:
        return await asyncio.gather(*[one(p) for p in PROMPTS])
    finally:
        await client.close()


@pytest.mark.parametrize("stream", [False, True])
def test_concurrent_completions_are_each_answered_once_with_one_engines_text(dp, single, stream):
    expected = asyncio.run(_completions(single, stream))
    before = [r.num_requests for r in dp.llm.replicas]
    tokens = dp.metric("kiln:generation_tokens_total")
    got = asyncio.run(_completions(dp, stream))
    assert [text for _, text, _ in got] == [text for _, text, _ in expected]
    assert [finish for _, _, finish in got] == ["length"] * len(PROMPTS)
    assert len({i for i, _, _ in got}) == len(PROMPTS)
    sent = [r.num_requests - b for r, b in zip(dp.llm.replicas, before)]
    assert sum(sent) == len(PROMPTS) and min(sent) >= 2  # balanced: both replicas served
    deadline = time.monotonic() + 10
    while dp.metric("kiln:generation_tokens_total") - tokens < 8 * len(PROMPTS) and time.monotonic() < deadline:
        time.sleep(0.05)  # (the replicas' stats arrive after their outputs)
    assert dp.metric("kiln:generation_tokens_total") - tokens == 8 * len(PROMPTS)  # summed over the replicas


def test_many_prompts_in_one_request_come_back_in_order(dp, single):
    kwargs = dict(model="tiny-llama", prompt=PROMPTS[:4], max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    got, expected = dp.client.completions.create(**kwargs), single.client.completions.create(**kwargs)
    assert [c.index for c in got.choices] == [0, 1, 2, 3]
    assert [c.text for c in got.choices] == [c.text for c in expected.choices]


def test_an_abandoned_stream_is_aborted_on_its_replica(dp):
    aborted, length = (dp.metric("kiln:request_success_total", finished_reason=r) for r in ("abort", "length"))
    # (400 tokens take the replica about 0.4 s on a 2-core host; the abort reaches it in a few ms)
    with dp.client.completions.create(model="tiny-llama", prompt=PROMPTS[0], max_tokens=400, temperature=0,
                                      stream=True, extra_body={"ignore_eos": True}) as stream:
        next(iter(stream))  # one chunk, then the connection closes
    deadline = time.monotonic() + 10
    while dp.metric("kiln:request_success_total", finished_reason="abort") == aborted and time.monotonic() < deadline:
        time.sleep(0.05)
    # the replica that held it cut it short (an abort sent elsewhere would let it run to length)
    assert dp.metric("kiln:request_success_total", finished_reason="abort") == aborted + 1
    assert dp.metric("kiln:request_success_total", finished_reason="length") == length
    assert dp.metric("kiln:num_requests_running") == 0 and dp.metric("kiln:kv_cache_usage_perc") == 0.0
    assert httpx.get(f"{dp.url}/health").status_code == 200


def test_replicas_of_tensor_parallel_engines_behind_the_server(config, single):
    """DP=2 x TP=2 (gloo on CPU): each replica is rank 0 of its own two-rank group; the completions
    are one engine's, and the server's shutdown stops replicas and workers."""
    import dataclasses

    server = Server(AsyncLLM.from_config(dataclasses.replace(config, tensor_parallel_size=2), data_parallel_size=2))
    try:
        expected = asyncio.run(_completions(single, False))
        assert [text for _, text, _ in asyncio.run(_completions(server, False))] == [t for _, t, _ in expected]
        assert not any(r.process.daemon for r in server.llm.replicas)
    finally:
        server.stop()
    assert not any(r.process.is_alive() for r in server.llm.replicas)


def test_replicas_as_ray_actors_behind_the_server(config, single):
    """distributed_executor_backend="ray": the replicas are Ray actors (a local cluster started
    here); streamed completions are one engine's text, spread over both; a killed replica actor
    turns /health and the requests to 503, naming it; the server's shutdown ends the actors."""
    import dataclasses

    ray = pytest.importorskip("ray")
    from kiln.runtime.async_data_parallel import _RayProcess

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        server = Server(AsyncLLM.from_config(dataclasses.replace(config, distributed_executor_backend="ray"),
                                             data_parallel_size=2))
        try:
            assert all(isinstance(r.process, _RayProcess) for r in server.llm.replicas)
            expected = asyncio.run(_completions(single, True))
            got = asyncio.run(_completions(server, True))
            assert [text for _, text, _ in got] == [text for _, text, _ in expected]
            assert min(r.num_requests for r in server.llm.replicas) >= 2  # both served
            ray.kill(server.llm.replicas[1].process.actor)
            assert_dead_replica_is_503(server, r"data-parallel replica 1 \(Ray actor on .*\) died")
        finally:
            server.stop()
        assert not any(r.process.is_alive() for r in server.llm.replicas)
    finally:
        if started:
            ray.shutdown()


def test_a_bad_data_parallel_size_is_a_clear_error(config, capsys):
    with pytest.raises(ValueError, match="data_parallel_size must be >= 1, got 0"):
        AsyncLLM.from_config(config, data_parallel_size=0)
    with pytest.raises(ValueError, match="data_parallel_size must be >= 1, got 0"):
        LLM(config.model, data_parallel_size=0)
    assert main(["serve", config.model, "--data-parallel-size", "0"]) == 1
    assert "kiln serve: error: data_parallel_size must be >= 1, got 0" in capsys.readouterr().err


def assert_dead_replica_is_503(server: Server, message: str) -> None:
    """/health turns 503 within 10 s of a replica's death, and a request gets 503 with `message`."""
    deadline = time.monotonic() + 10
    while httpx.get(f"{server.url}/health").status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(f"{server.url}/health").status_code == 503
    with pytest.raises(openai.APIStatusError, match=message) as e:
        server.client.completions.create(model="tiny-llama", prompt=PROMPTS[0], max_tokens=4)
    assert e.value.status_code == 503


def test_a_dead_replica_turns_health_and_requests_to_503(dp):
    os.kill(dp.llm.replicas[1].process.pid, signal.SIGKILL)
    assert_dead_replica_is_503(dp, r"data-parallel replica 1 \(pid \d+\) died, exit code -9")
