"""The OpenAI-compatible server, end to end: a real uvicorn server on 127.0.0.1 (one per model,
in a background thread) on the tiny local checkpoints, talked to with the official `openai`
client and with httpx for what the client will not send (bad bodies, cancelled streams)."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

import torch  # noqa: E402

from kiln import LLM, SamplingParams  # noqa: E402
from kiln.runtime.async_engine import AsyncLLM  # noqa: E402
from kiln.runtime.config import EngineConfig  # noqa: E402
from kiln.runtime.protocol import MAX_N  # noqa: E402
from kiln.runtime.server import build_app  # noqa: E402

KEY = "test-key"
MAX_MODEL_LEN = 128
MAX_BODY = 64 << 10
LONG_TEXT = "word " * 300  # well over MAX_MODEL_LEN tokens
PROMPTS = ["Hello, my name is", "The capital of France is", "Once upon a time there was a small engine",
           "Paged attention keeps keys and values"]


class Server:
    """A uvicorn server for one AsyncLLM, on a free port, in a daemon thread."""

    def __init__(self, llm: AsyncLLM, name: str, max_body: int = MAX_BODY):
        self.llm, self.name = llm, name
        app = build_app(llm, name, api_key=KEY, max_body_bytes=max_body)
        # port 0: the OS picks a free port when uvicorn binds, so no other process can take it first
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", backlog=1024))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, timeout=30)

    def stop(self) -> None:
        self.http.close()
        self.server.should_exit = True
        self.thread.join(10)
        self.llm.shutdown()

    def metrics(self) -> dict[str, float]:
        """name{labels} -> value, from /metrics."""
        text = httpx.get(f"{self.url}/metrics").text
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines() if line and not line.startswith("#")}


def _metric(metrics: dict, name: str, **labels) -> float:
    for key, value in metrics.items():
        if key.split("{")[0] == name and all(f'{k}="{v}"' in key for k, v in labels.items()):
            return value
    return 0.0


@pytest.fixture(scope="module")
def gen(llama_path):
    server = Server(AsyncLLM.from_config(EngineConfig(model=llama_path, max_model_len=MAX_MODEL_LEN)), "tiny-llama")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def embed(llama_path):
    config = EngineConfig(model=llama_path, runner="pooling", convert="embed", max_model_len=MAX_MODEL_LEN)
    server = Server(AsyncLLM.from_config(config), "tiny-embed")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cross_encoder_path(tmp_path_factory, llama_path):
    """A LlamaForSequenceClassification with one label: a tiny reranker."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    path = tmp_path_factory.mktemp("reranker")
    config = AutoConfig.from_pretrained(llama_path)
    config.num_labels, config.architectures = 1, ["LlamaForSequenceClassification"]
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(llama_path).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def rerank(cross_encoder_path):
    config = EngineConfig(model=cross_encoder_path, runner="pooling", max_model_len=MAX_MODEL_LEN)
    server = Server(AsyncLLM.from_config(config), "tiny-reranker")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def offline(llama_path):
    return LLM(llama_path, max_model_len=MAX_MODEL_LEN)


# ---------------------------------------------------------------- generate


def test_completion_equals_offline_generate(gen, offline):
    ref = offline.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    out = gen.client.completions.create(model="tiny-llama", prompt=PROMPTS, max_tokens=8, temperature=0,
                                        extra_body={"ignore_eos": True})
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert [c.text for c in out.choices] == [r.outputs[0].text for r in ref]
    assert all(c.finish_reason == "length" for c in out.choices)
    assert out.usage.prompt_tokens == sum(len(r.prompt_token_ids) for r in ref)
    assert out.usage.completion_tokens == 4 * 8
    ids = gen.client.completions.create(model="tiny-llama", prompt=ref[0].prompt_token_ids, max_tokens=8, temperature=0,
                                        extra_body={"ignore_eos": True})
    assert ids.choices[0].text == ref[0].outputs[0].text


def test_streaming_equals_non_streaming(gen):
    for prompt in PROMPTS[:2]:
        whole = gen.client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=12, temperature=0)
        chunks = list(gen.client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=12, temperature=0,
                                                    stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, my name is"}]
    whole = gen.client.chat.completions.create(model="tiny-llama", messages=messages, max_completion_tokens=12,
                                               temperature=0)
    chunks = list(gen.client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=12,
                                                     temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert whole.choices[0].message.role == "assistant" and whole.object == "chat.completion"


def test_chat_uses_the_chat_template(gen, offline):
    messages = [{"role": "user", "content": "The capital of France is"}]
    ref = offline.chat(messages, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    out = gen.client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=8, temperature=0)
    assert out.choices[0].message.content == ref.outputs[0].text
    assert out.usage.prompt_tokens == len(ref.prompt_token_ids)


def test_stop_strings_stream_the_same_text(gen):
    """A stop string cut from the final text must never have been streamed in part."""
    free = gen.client.completions.create(model="tiny-llama", prompt=PROMPTS[2], max_tokens=16, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text
    stop = free[5:8]
    whole = gen.client.completions.create(model="tiny-llama", prompt=PROMPTS[2], max_tokens=16, temperature=0,
                                          stop=[stop], extra_body={"ignore_eos": True}).choices[0]
    assert whole.finish_reason == "stop" and stop not in whole.text and free.startswith(whole.text)
    chunks = gen.client.completions.create(model="tiny-llama", prompt=PROMPTS[2], max_tokens=16, temperature=0,
                                           stop=stop, stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in chunks) == whole.text


def test_n_and_seed(gen):
    kw = dict(model="tiny-llama", prompt=PROMPTS[0], max_tokens=8, temperature=1.0, seed=7, n=2,
              extra_body={"ignore_eos": True})
    a, b = gen.client.completions.create(**kw), gen.client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1] and a.usage.completion_tokens == 16
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded: reproducible
    streamed = list(gen.client.completions.create(**kw, stream=True))
    for i in range(2):
        assert "".join(c.choices[0].text for c in streamed if c.choices[0].index == i) == a.choices[i].text
    chat = gen.client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=4, n=3, temperature=0)
    assert [c.index for c in chat.choices] == [0, 1, 2]
    assert len({c.message.content for c in chat.choices}) == 1  # greedy: all the same


def test_logprobs(gen):
    out = gen.client.completions.create(model="tiny-llama", prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=3,
                                        extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == out.choices[0].text
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) <= 3 and max(top.values()) == pytest.approx(chosen)  # greedy: the chosen is the best
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]

    chat = gen.client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 2 and item.top_logprobs[0].logprob == pytest.approx(item.logprob)
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
    streamed = list(gen.client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "Hi"}],
                                                       max_tokens=5, temperature=0, logprobs=True, top_logprobs=2,
                                                       stream=True))
    tokens = [t.token for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert tokens == [t.token for t in content]


def test_models_and_health(gen):
    models = gen.client.models.list()
    assert [m.id for m in models.data] == ["tiny-llama"] and models.data[0].max_model_len == MAX_MODEL_LEN
    assert httpx.get(f"{gen.url}/health").status_code == 200  # no key needed for probes
    metrics = gen.metrics()
    assert _metric(metrics, "kiln:kv_cache_usage_perc") == 0.0
    assert _metric(metrics, "kiln:generation_tokens_total") > 0
    assert _metric(metrics, "kiln:time_to_first_token_seconds_count") > 0
    assert _metric(metrics, "kiln:time_per_output_token_seconds_count") > 0


def test_api_key(gen):
    bad = openai.OpenAI(base_url=f"{gen.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.completions.create(model="tiny-llama", prompt="Hi", max_tokens=2)
    assert e.value.status_code == 401
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(f"{gen.url}/v1/completions", json={"prompt": "Hi"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{gen.url}/v1/models").status_code == 401


def test_generate_endpoints_refuse_pooling_models_and_back(gen, embed):
    r = embed.http.post("/v1/completions", json={"prompt": "Hi"})
    assert r.status_code == 400 and "pooling model" in r.json()["error"]["message"]
    r = embed.http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 400 and "pooling model" in r.json()["error"]["message"]
    for path, body in [("/v1/embeddings", {"input": "Hi"}), ("/score", {"text_1": "a", "text_2": "b"}),
                       ("/rerank", {"query": "a", "documents": ["b"]}), ("/classify", {"input": "Hi"})]:
        r = gen.http.post(path, json=body)
        assert r.status_code == 400 and "--runner pooling" in r.json()["error"]["message"], path
    r = embed.http.post("/classify", json={"input": "Hi"})  # an embedding model has no classifier
    assert r.status_code == 400 and "classify" in r.json()["error"]["message"]


# ---------------------------------------------------------------- pooling


def test_embeddings(embed, llama_path):
    texts = ["Hello, my name is", "The capital of France is"]
    ref = LLM(llama_path, runner="pooling", convert="embed", max_model_len=MAX_MODEL_LEN).embed(texts, use_tqdm=False)
    out = embed.client.embeddings.create(model="tiny-embed", input=texts)  # the client asks for base64
    assert [d.index for d in out.data] == [0, 1]
    for d, r in zip(out.data, ref):
        torch.testing.assert_close(torch.tensor(d.embedding), torch.tensor(r.outputs.embedding), atol=1e-5, rtol=0)
    floats = embed.client.embeddings.create(model="tiny-embed", input=texts[0], encoding_format="float")
    torch.testing.assert_close(torch.tensor(floats.data[0].embedding), torch.tensor(ref[0].outputs.embedding),
                               atol=1e-5, rtol=0)
    short = embed.client.embeddings.create(model="tiny-embed", input=[[5, 6, 7]], dimensions=16)
    assert len(short.data[0].embedding) == 16 and short.usage.prompt_tokens == 3


def test_score_and_rerank_with_an_embedding_model(embed):
    docs = ["Paris is the capital of France.", "The sea is calm.", "A compiler turns programs into kernels."]
    score = embed.http.post("/score", json={"model": "tiny-embed", "text_1": "capital of France", "text_2": docs})
    assert score.status_code == 200, score.text
    scores = [d["score"] for d in score.json()["data"]]
    r = embed.http.post("/rerank", json={"model": "tiny-embed", "query": "capital of France", "documents": docs,
                                         "top_n": 2})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 2 and results[0]["relevance_score"] >= results[1]["relevance_score"]
    best = max(range(3), key=lambda i: scores[i])
    assert results[0]["index"] == best and results[0]["document"] == {"text": docs[best]}
    assert results[0]["relevance_score"] == pytest.approx(scores[best], abs=1e-6)


def test_cross_encoder_score_rerank_classify(rerank, cross_encoder_path):
    docs = ["Paris is the capital of France.", "The sea is calm."]
    ref = LLM(cross_encoder_path, runner="pooling", max_model_len=MAX_MODEL_LEN).score("capital?", docs, use_tqdm=False)
    score = rerank.http.post("/score", json={"text_1": "capital?", "text_2": docs}).json()
    assert [d["score"] for d in score["data"]] == pytest.approx([r.outputs.score for r in ref], abs=1e-5)
    results = rerank.http.post("/v1/rerank", json={"query": "capital?", "documents": docs,
                                                   "return_documents": False}).json()["results"]
    assert sorted(r["index"] for r in results) == [0, 1] and "document" not in results[0]
    assert results[0]["relevance_score"] == pytest.approx(max(r.outputs.score for r in ref), abs=1e-5)
    classified = rerank.http.post("/classify", json={"input": docs}).json()
    assert [len(d["probs"]) for d in classified["data"]] == [1, 1] and classified["usage"]["prompt_tokens"] > 0


# ---------------------------------------------------------------- load


def test_load_with_cancellations(gen):
    """200 concurrent streams, every fourth closed by the client after its first chunk: the others
    get exactly max_tokens tokens, the cancelled ones are aborted (not run to their end), the KV
    cache is all free afterwards, and /health answers throughout."""
    n, max_tokens = 200, 8
    before = gen.metrics()

    async def main():
        limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=n + 10)
        headers = {"Authorization": f"Bearer {KEY}"}
        async with httpx.AsyncClient(base_url=gen.url, headers=headers, limits=limits, timeout=60) as client, \
                httpx.AsyncClient(base_url=gen.url, timeout=10) as prober:
            done = asyncio.Event()

            async def probe() -> list[float]:
                latencies = []
                while not done.is_set():
                    t0 = time.monotonic()
                    r = await prober.get("/health")
                    assert r.status_code == 200
                    latencies.append(time.monotonic() - t0)
                    await asyncio.sleep(0.02)
                return latencies

            async def one(i: int):
                cancel = i % 4 == 0
                body = {"model": "tiny-llama", "prompt": PROMPTS[i % len(PROMPTS)], "temperature": 0,
                        "max_tokens": 100 if cancel else max_tokens, "ignore_eos": True, "stream": True,
                        "stream_options": {"include_usage": True}}
                usage, finish = None, None
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        assert "error" not in chunk, chunk
                        if cancel and chunk["choices"]:
                            return "cancelled"  # leaving the block closes the connection mid-stream
                        if chunk["choices"] and chunk["choices"][0]["finish_reason"]:
                            finish = chunk["choices"][0]["finish_reason"]
                        usage = chunk.get("usage") or usage
                return finish, usage["completion_tokens"]

            prober_task = asyncio.ensure_future(probe())
            results = await asyncio.gather(*[one(i) for i in range(n)])
            done.set()
            return results, await prober_task

    t0 = time.monotonic()
    results, health = asyncio.run(main())
    elapsed = time.monotonic() - t0
    assert results.count("cancelled") == n // 4
    assert [r for r in results if r != "cancelled"] == [("length", max_tokens)] * (n - n // 4)
    assert len(health) >= 2 and max(health) < 5.0
    assert elapsed < 45, f"the load took {elapsed:.1f}s"

    deadline = time.monotonic() + 10
    while True:  # the aborts reach the engine between steps
        after = gen.metrics()
        idle = (_metric(after, "kiln:num_requests_running") == 0 and _metric(after, "kiln:num_requests_waiting") == 0
                and _metric(after, "kiln:kv_cache_usage_perc") == 0.0)
        aborted = (_metric(after, "kiln:request_success_total", finished_reason="abort")
                   - _metric(before, "kiln:request_success_total", finished_reason="abort"))
        if (idle and aborted == n // 4) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert idle, after
    assert aborted == n // 4  # cut short, not run to max_tokens=100
    length = (_metric(after, "kiln:request_success_total", finished_reason="length")
              - _metric(before, "kiln:request_success_total", finished_reason="length"))
    assert length == n - n // 4
    stats = gen.llm.stats
    assert stats.num_unfinished == 0 and stats.kv_cache_usage == 0.0


# ---------------------------------------------------------------- bad input


ENDPOINTS = {  # endpoint -> (server fixture, a valid body, its text field, a value of the wrong type)
    "/v1/completions": ("gen", {"model": "tiny-llama", "prompt": "Hello", "max_tokens": 2}, "prompt", {"a": 1}),
    "/v1/chat/completions": ("gen", {"model": "tiny-llama", "messages": [{"role": "user", "content": "Hello"}],
                                     "max_tokens": 2}, "messages", "Hello"),
    "/v1/embeddings": ("embed", {"model": "tiny-embed", "input": "Hello"}, "input", 5),
    "/score": ("embed", {"model": "tiny-embed", "text_1": "Hello", "text_2": ["a", "b"]}, "text_2", [1, 2]),
    "/rerank": ("rerank", {"model": "tiny-reranker", "query": "Hello", "documents": ["a", "b"]}, "documents", "a"),
    "/classify": ("rerank", {"model": "tiny-reranker", "input": ["Hello"]}, "input", True),
}


def _long(endpoint: str, body: dict) -> tuple[dict, str]:
    """The body with a text over max_model_len, and the field the error must name."""
    if endpoint == "/v1/chat/completions":
        return {**body, "messages": [{"role": "user", "content": LONG_TEXT}]}, "messages"
    if endpoint == "/score":
        return {**body, "text_2": ["a", LONG_TEXT]}, "text_2[1]"
    if endpoint == "/rerank":
        return {**body, "documents": ["a", LONG_TEXT]}, "documents[1]"
    field = ENDPOINTS[endpoint][2]
    return {**body, field: LONG_TEXT}, field


CASES = ["malformed_json", "not_an_object", "wrong_type", "unknown_model", "prompt_too_long", "max_tokens_below_1",
         "n_too_large", "negative_temperature", "unknown_field", "body_too_large"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
def test_bad_input(endpoint, case, request):
    name, valid, field, wrong = ENDPOINTS[endpoint]
    server = request.getfixturevalue(name)
    body, status, param = None, 400, None
    if case == "malformed_json":
        content = json.dumps(valid)[:-3].encode()
    elif case == "not_an_object":
        content = b"[1, 2]"
    elif case == "body_too_large":
        body, status = {**valid, field: "x" * (MAX_BODY + 1)}, 413
    elif case == "wrong_type":
        body, param = {**valid, field: wrong}, field
    elif case == "unknown_model":
        body, status, param = {**valid, "model": "no-such-model"}, 404, "model"
    elif case == "prompt_too_long":
        body, param = _long(endpoint, valid)
    elif case == "max_tokens_below_1":
        body, param = {**valid, "max_tokens": 0}, "max_tokens"
    elif case == "n_too_large":
        body, param = {**valid, "n": MAX_N + 1}, "n"
    elif case == "negative_temperature":
        body, param = {**valid, "temperature": -0.5}, "temperature"
    elif case == "unknown_field":
        body, param = {**valid, "frobnicate": 1}, "frobnicate"
    if body is not None:
        content = json.dumps(body).encode()
    r = server.http.post(endpoint, content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param, error
        assert re.search(re.escape(param.split("[")[0]), error["message"]), error
    # the server goes on: the valid request right after succeeds
    ok = server.http.post(endpoint, json=valid)
    assert ok.status_code == 200, ok.text


def test_unknown_route_and_method(gen):
    r = gen.http.get("/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()
    r = gen.http.get("/v1/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_unsupported_fields_are_named(gen):
    for extra, param in [({"logit_bias": {"5": 1.0}}, "logit_bias"), ({"best_of": 3}, "best_of"),
                         ({"stream_options": {"include_usage": True}}, "stream_options"), ({"suffix": "x"}, "suffix"),
                         ({"logprobs": 21}, "logprobs"), ({"stop": [""]}, "stop"), ({"seed": -1}, "seed")]:
        r = gen.http.post("/v1/completions", json={"prompt": "Hi", **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (extra, r.text)
    r = gen.http.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "Hi"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].role"
    r = gen.http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "top_logprobs": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"


def test_overload_is_429(gen):
    gen.llm.max_pending_requests = 0
    try:
        r = gen.http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    finally:
        gen.llm.max_pending_requests = None
    assert gen.http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200


def test_a_client_gone_before_its_response_aborts_the_request(gen):
    """A non-streaming request whose client disconnects is aborted, not run to max_tokens."""
    def slow_down(engine):  # 20 ms a step: 100 tokens take 2 s, the client gives up after 0.2 s
        execute = engine.runner.execute

        def slow(*args, **kwargs):
            time.sleep(0.02)
            return execute(*args, **kwargs)

        engine.runner.execute = slow

    asyncio.run(gen.llm.call(slow_down))
    try:
        for path, body in [("/v1/completions", {"prompt": "Hi"}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})]:
            aborted = _metric(gen.metrics(), "kiln:request_success_total", finished_reason="abort")
            with pytest.raises(httpx.TimeoutException):
                gen.http.post(path, json={**body, "max_tokens": 100, "ignore_eos": True}, timeout=0.2)
            deadline = time.monotonic() + 1.5  # well before the 2 s the request would run
            while _metric(gen.metrics(), "kiln:request_success_total", finished_reason="abort") == aborted:
                assert time.monotonic() < deadline, f"{path}: the request was not aborted"
                time.sleep(0.02)
    finally:
        asyncio.run(gen.llm.call(lambda engine: engine.runner.__dict__.pop("execute", None)))
