"""The OpenAI-compatible HTTP server: FastAPI routes over an AsyncLLM.

    app = build_app(AsyncLLM.from_config(EngineConfig(model=path)), served_model_name="my-model")
    serve(...)  # or `kiln serve MODEL`

Generate models: /v1/completions, /v1/chat/completions (server-sent events when stream=true).
Pooling models: /v1/embeddings, /score, /rerank (also /v1/rerank, /v2/rerank), /classify.
Both: /v1/models, /health, /metrics (Prometheus).

Errors are OpenAI-shaped JSON, {"error": {"message", "type", "param", "code"}}: 400 for a bad body
(naming the field) or an endpoint the model does not serve, 401 for a missing or wrong API key,
404 for an unknown model name or path, 413 for a body over `max_body_bytes`, 429 when more than
`max_pending_requests` are in flight, 500 when the model step fails, 503 when the engine is down.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator

import jinja2
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from kiln.runtime.async_engine import (AsyncLLM, EngineDeadError, EngineOverloadedError, RequestStream,
                                      gather_or_cancel)
from kiln.runtime.metrics import Metrics
from kiln.runtime.outputs import CompletionOutput, RequestOutput
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.score_templates import cross_encoder_prompts
from kiln.runtime.protocol import (MAX_LOGPROBS, MAX_N, ChatCompletionRequest, ClassificationRequest, CompletionRequest,
                                   EmbeddingRequest, RequestError, RerankRequest, ScoreRequest, validation_error)

logger = logging.getLogger("kiln")

DEFAULT_MAX_BODY_BYTES = 16 << 20
_OPEN_PATHS = ("/health", "/metrics")  # answered without an API key (probes and scrapers)

__all__ = ["build_app", "serve", "DEFAULT_MAX_BODY_BYTES", "MAX_N", "MAX_LOGPROBS"]


def _error(status: int, message: str, param: str | None = None, type: str | None = None,
           code: str | None = None, headers: dict | None = None) -> JSONResponse:
    type = type or {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error",
                    500: "internal_server_error", 503: "service_unavailable"}.get(status, "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}},
                        status_code=status, headers=headers)


def _error_body(e: BaseException) -> tuple[int, dict]:
    """An exception as (status, OpenAI error body)."""
    if isinstance(e, RequestError):
        status, body = e.status, {"message": e.message, "type": e.type, "param": e.param, "code": e.code}
    elif isinstance(e, (ValueError, jinja2.TemplateError)):
        status, body = 400, {"message": str(e), "type": "invalid_request_error", "param": None, "code": None}
    elif isinstance(e, EngineOverloadedError):
        status, body = 429, {"message": str(e), "type": "rate_limit_error", "param": None, "code": "rate_limit_exceeded"}
    elif isinstance(e, EngineDeadError):
        status, body = 503, {"message": str(e), "type": "service_unavailable", "param": None, "code": None}
    else:
        status, body = 500, {"message": f"internal error: {e}", "type": "internal_server_error", "param": None,
                             "code": None}
    return status, {"error": body}


class _Guard:
    """ASGI middleware in front of the routes: the API key, and a declared body over the limit."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.api_key is not None and scope["path"] not in _OPEN_PATHS:
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                message = "missing API key: send 'Authorization: Bearer KEY'" if not given else "invalid API key"
                return await _error(401, message, code="invalid_api_key",
                                    headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return await _error(413, f"the request body has {int(length)} bytes, more than the limit of "
                                f"{self.max_body_bytes} (max_body_bytes)", code="request_too_large",
                                headers={"Connection": "close"})(scope, receive, send)
        return await self.app(scope, receive, send)


class _Handlers:
    """The routes' logic, sharing the engine, the served names and the limits."""

    def __init__(self, llm: AsyncLLM, names: list[str], max_body_bytes: int, model_path: str | None):
        self.llm, self.names, self.max_body_bytes, self.model_path = llm, names, max_body_bytes, model_path
        self.created = int(time.time())

    # ------------------------------------------------------------ request plumbing

    async def read(self, request: Request, model_cls):
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body_bytes:
                raise RequestError(f"the request body is over the limit of {self.max_body_bytes} bytes (max_body_bytes)",
                                   None, 413, "request_too_large")
        try:
            return model_cls.model_validate_json(bytes(body))
        except ValidationError as e:
            raise validation_error(e) from None

    def model_name(self, requested: str | None) -> str:
        if requested is not None and requested not in self.names:
            raise RequestError(f"The model `{requested}` does not exist; this server serves {', '.join(self.names)}",
                               "model", 404, "model_not_found")
        return requested or self.names[0]

    def need_generate(self, endpoint: str) -> None:
        if self.llm.is_pooling:
            raise RequestError(f"{endpoint} needs a generative model; {self.names[0]} is loaded as a pooling model "
                               f"({self.llm.architecture}, tasks {'/'.join(self.llm.tasks)}): use /v1/embeddings, "
                               "/score, /rerank or /classify, or start the server with --runner generate", "model")

    def need_task(self, endpoint: str, task: str) -> None:
        if not self.llm.is_pooling:
            raise RequestError(f"{endpoint} needs a pooling model; {self.names[0]} is loaded for generation "
                               f"({self.llm.architecture}): start the server with --runner pooling", "model")
        if task not in self.llm.tasks:
            raise RequestError(f"{endpoint} needs a model that serves {task!r}; {self.names[0]} "
                               f"({self.llm.architecture}) serves {'/'.join(self.llm.tasks)}", "model")

    async def prepare(self, prompts: list, param: str, pooling: bool = False, truncate: int | None = None,
                      echo: bool = False) -> list[dict]:
        """Tokenize and validate the prompts on the engine thread (prompt errors name `param`)."""
        def run(engine):
            prepared = engine.prepare_prompts(prompts, pooling, [truncate] * len(prompts))
            if echo and engine.tokenizer is not None:
                for p in prepared:
                    if p["prompt"] is None:
                        p["prompt"] = engine.tokenizer.decode(p["prompt_token_ids"])
            return prepared

        try:
            return await self.llm.call(run)
        except ValueError as e:
            raise RequestError(f"{param}: {e}", param) from None

    async def start(self, request_id: str, prompts: list, params) -> list[RequestStream]:
        """Add every prompt as a request (ids request_id-0, -1, ...); if one is refused, abort the rest."""
        results = await asyncio.gather(*[self.llm.add_request(f"{request_id}-{i}", p, params)
                                         for i, p in enumerate(prompts)], return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            for r in results:
                if isinstance(r, RequestStream):
                    r.abort()
            raise failed[0]
        return results

    async def collect(self, request: Request, streams: list[RequestStream]) -> list:
        """The final output of each stream; the requests are aborted if the client goes away first."""
        async def last(stream):
            out = None
            async for out in stream:
                pass
            if out is None or not out.finished:
                raise EngineDeadError(f"request {stream.request_id!r} ended without a finished output")
            return out

        try:
            return await _unless_disconnected(request, gather_or_cancel([last(s) for s in streams]))
        finally:
            for s in streams:
                s.abort()

    # ------------------------------------------------------------ /v1/completions

    async def completions(self, request: Request):
        req = await self.read(request, CompletionRequest)
        model = self.model_name(req.model)
        self.need_generate("/v1/completions")
        params = req.to_sampling_params()
        prompts = await self.prepare(req.prompts(), "prompt", echo=bool(req.echo))
        request_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        streams = await self.start(request_id, prompts, params)
        head = {"id": request_id, "object": "text_completion", "created": created, "model": model}
        echoes = [(p["prompt"] or "") if req.echo else "" for p in prompts]
        if req.stream:
            return _sse(self._stream_completion(streams, head, params, req, echoes, prompts), streams)
        finals = await self.collect(request, streams)
        choices = []
        for i, out in enumerate(finals):
            for c in out.outputs:
                choices.append({"index": i * params.n + c.index, "text": echoes[i] + c.text,
                                "logprobs": _completion_logprobs(c, 0, len(c.token_ids), req.logprobs, 0)
                                if req.logprobs is not None else None,
                                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
        return {**head, "choices": choices, "usage": _usage(finals)}

    async def _stream_completion(self, streams, head, params, req: CompletionRequest, echoes, prompts):
        n, holdback = params.n, max((len(s) for s in params.stop), default=1) - 1
        state: dict[int, _ChoiceState] = {}
        num_prompt = sum(len(p["prompt_token_ids"]) for p in prompts)
        async for i, out in _merge(streams):
            for c in out.outputs:
                k = i * n + c.index
                st = state.setdefault(k, _ChoiceState())
                delta = st.advance(c, holdback)
                if delta is None:
                    continue
                text, start = delta
                if not st.echoed:
                    text, st.echoed = echoes[i] + text, True
                choice = {"index": k, "text": text,
                          "logprobs": _completion_logprobs(c, start, st.num_tokens, req.logprobs, st.offset)
                          if req.logprobs is not None else None,
                          "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                st.offset += len(text)
                chunk = {**head, "choices": [choice]}
                if req.continuous_usage:
                    chunk["usage"] = _counts(num_prompt, sum(s.num_tokens for s in state.values()))
                yield chunk
        if req.include_usage:
            yield {**head, "choices": [], "usage": _counts(num_prompt, sum(s.num_tokens for s in state.values()))}

    # ------------------------------------------------------------ /v1/chat/completions

    async def chat(self, request: Request):
        req = await self.read(request, ChatCompletionRequest)
        model = self.model_name(req.model)
        self.need_generate("/v1/chat/completions")
        params = req.to_sampling_params()
        messages = [m.as_dict() for m in req.messages]
        add_generation_prompt = req.add_generation_prompt if req.add_generation_prompt is not None else \
            not req.continue_final_message

        def render(engine):
            tokenizer = engine.tokenizer
            if tokenizer is None:
                raise ValueError("chat needs a tokenizer (the server was started with skip_tokenizer_init)")
            template = req.chat_template or tokenizer.chat_template
            if template is None:
                raise ValueError("the model's tokenizer has no chat template; pass chat_template")
            try:
                ids = tokenizer.apply_chat_template(
                    messages, chat_template=template, tokenize=True, add_generation_prompt=add_generation_prompt,
                    continue_final_message=bool(req.continue_final_message), return_dict=False,
                    **(req.chat_template_kwargs or {}))
            except (jinja2.TemplateError, TypeError, KeyError, IndexError) as e:
                raise ValueError(f"the chat template failed on these messages: {e}") from None
            return engine.prepare_prompts([{"prompt_token_ids": list(ids)}])

        try:
            prompts = await self.llm.call(render)
        except ValueError as e:
            raise RequestError(f"messages: {e}", "messages") from None
        request_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        streams = await self.start(request_id, prompts, params)
        head = {"id": request_id, "object": "chat.completion", "created": created, "model": model}
        top = req.top_logprobs or 0
        if req.stream:
            return _sse(self._stream_chat(streams, {**head, "object": "chat.completion.chunk"}, params, req, prompts),
                        streams)
        (out,) = await self.collect(request, streams)
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": {"content": _chat_logprobs(c, 0, len(c.token_ids), top)} if req.logprobs else None,
                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason} for c in out.outputs]
        return {**head, "choices": choices, "usage": _usage([out])}

    async def _stream_chat(self, streams, head, params, req: ChatCompletionRequest, prompts):
        holdback = max((len(s) for s in params.stop), default=1) - 1
        num_prompt = len(prompts[0]["prompt_token_ids"])
        top = req.top_logprobs or 0
        state = {k: _ChoiceState() for k in range(params.n)}
        for k in range(params.n):
            yield {**head, "choices": [{"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                        "finish_reason": None}]}
        async for _, out in _merge(streams):
            for c in out.outputs:
                st = state[c.index]
                delta = st.advance(c, holdback)
                if delta is None:
                    continue
                text, start = delta
                choice = {"index": c.index, "delta": {"content": text} if text or c.finish_reason is None else {},
                          "logprobs": {"content": _chat_logprobs(c, start, st.num_tokens, top)} if req.logprobs else None,
                          "finish_reason": c.finish_reason}
                if c.finish_reason is not None:
                    choice["stop_reason"] = c.stop_reason
                chunk = {**head, "choices": [choice]}
                if req.continuous_usage:
                    chunk["usage"] = _counts(num_prompt, sum(s.num_tokens for s in state.values()))
                yield chunk
        if req.include_usage:
            yield {**head, "choices": [], "usage": _counts(num_prompt, sum(s.num_tokens for s in state.values()))}

    # ------------------------------------------------------------ pooling endpoints

    async def _pool(self, request: Request, inputs: list, params, id_prefix: str) -> list:
        prompts = await self.prepare(inputs, "input", pooling=True, truncate=params.truncate_prompt_tokens)
        streams = await self.start(f"{id_prefix}-{uuid.uuid4().hex}", prompts, params)
        return await self.collect(request, streams)

    async def embeddings(self, request: Request):
        req = await self.read(request, EmbeddingRequest)
        model = self.model_name(req.model)
        self.need_task("/v1/embeddings", "embed")
        params = req.pooling_params()
        outs = await self._pool(request, req.inputs(), params, "embd")
        data = []
        for i, out in enumerate(outs):
            vector = out.outputs.data.float().numpy()
            embedding = (base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
                         if req.encoding_format == "base64" else vector.tolist())
            data.append({"object": "embedding", "index": i, "embedding": embedding})
        tokens = sum(len(o.prompt_token_ids) for o in outs)
        return {"id": f"embd-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": model,
                "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    async def classify(self, request: Request):
        req = await self.read(request, ClassificationRequest)
        model = self.model_name(req.model)
        self.need_task("/classify", "classify")
        outs = await self._pool(request, req.inputs(), req.pooling_params(), "classify")
        labels = getattr(self.llm.engine.hf_config, "id2label", None) or {}
        data = []
        for i, out in enumerate(outs):
            probs = out.outputs.data.reshape(-1).tolist()
            best = int(np.argmax(probs))
            data.append({"index": i, "label": labels.get(best, str(best)), "probs": probs, "num_classes": len(probs)})
        tokens = sum(len(o.prompt_token_ids) for o in outs)
        return {"id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": model,
                "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    async def _score(self, request: Request, first: list[str], second: list[str], truncate: int | None,
                     fields: tuple[str, str], first_single: bool):
        if truncate is None:  # a text (or pair) too long is the client's error: name its field
            await self.llm.call(lambda e: _check_score_lengths(e, first, second, fields, first_single))

        async def run():
            try:
                return await self.llm.score(first, second, f"score-{uuid.uuid4().hex}", truncate)
            except RequestError:
                raise
            except ValueError as e:
                raise RequestError(str(e), None) from None

        return await _unless_disconnected(request, run())

    async def score(self, request: Request):
        req = await self.read(request, ScoreRequest)
        model = self.model_name(req.model)
        self.need_task("/score", "score")
        req.check_truncate()
        first, second = req.pairs()
        scores = await self._score(request, first, second, req.truncate_prompt_tokens, ("text_1", "text_2"),
                                   isinstance(req.text_1, str))
        tokens = sum(t for _, t in scores)
        return {"id": f"score-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": model,
                "data": [{"index": i, "object": "score", "score": s} for i, (s, _) in enumerate(scores)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    async def rerank(self, request: Request):
        req = await self.read(request, RerankRequest)
        model = self.model_name(req.model)
        self.need_task("/rerank", "score")
        req.check_truncate()
        scores = await self._score(request, [req.query] * len(req.documents), req.documents, req.truncate_prompt_tokens,
                                   ("query", "documents"), True)
        order = sorted(range(len(scores)), key=lambda i: -scores[i][0])
        if req.top_n:
            order = order[:req.top_n]
        results = []
        for i in order:
            result = {"index": i, "relevance_score": scores[i][0]}
            if req.return_documents is not False:
                result["document"] = {"text": req.documents[i]}
            results.append(result)
        tokens = sum(t for _, t in scores)
        return {"id": f"rerank-{uuid.uuid4().hex}", "model": model, "results": results,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    # ------------------------------------------------------------ the rest

    # ------------------------------------------------------------ /v1/audio

    async def transcriptions(self, request: Request):
        return await self._audio(request, "transcribe")

    async def translations(self, request: Request):
        return await self._audio(request, "translate")

    async def _audio(self, request: Request, task: str):
        """OpenAI's multipart upload: file, model, language, response_format (json, text,
        verbose_json, srt, vtt), temperature. Audio over 30 s is cut into windows."""
        from kiln.runtime import audio as audio_io
        from kiln.runtime import transcription as tr

        endpoint = f"/v1/audio/{'transcriptions' if task == 'transcribe' else 'translations'}"
        engine = self.llm.engine
        if not getattr(engine, "is_encoder_decoder", False):
            raise RequestError(f"{endpoint} needs a speech-to-text model; {self.names[0]} ({self.llm.architecture}) "
                               "is not one", "model")
        try:
            form = await request.form()
        except Exception as e:  # noqa: BLE001 - a body that is not multipart form data
            raise RequestError(f"{endpoint} takes multipart/form-data with a 'file' field ({e})", "file") from None
        model = self.model_name(form.get("model"))
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise RequestError("file: an audio file upload is required", "file")
        fmt = form.get("response_format") or "json"
        if fmt not in ("json", "text", "verbose_json", "srt", "vtt"):
            raise RequestError(f"response_format must be json, text, verbose_json, srt or vtt, got {fmt!r}",
                               "response_format")
        try:
            temperature = float(form.get("temperature") or 0.0)
        except ValueError:
            raise RequestError("temperature must be a number", "temperature") from None
        if not 0.0 <= temperature <= 2.0:
            raise RequestError(f"temperature must be in [0, 2], got {temperature}", "temperature")
        data = await upload.read()
        try:  # decoding and log-mel features are CPU work: off the event loop, off the engine thread
            samples = await asyncio.to_thread(audio_io.load_audio, data)
            features = await asyncio.to_thread(tr.features_of, engine.feature_extractor, samples)
        except ValueError as e:
            raise RequestError(f"file: {e}", "file") from None
        tokenizer, request_id = engine.tokenizer, f"trsc-{uuid.uuid4().hex}"
        language = form.get("language") or None
        if language is None:
            prompt, params = tr.detection_request(tokenizer, features[0])
            (detected,) = await self.collect(request, await self.start(f"{request_id}-lang", [prompt], params))
            language = tr.languages(tokenizer)[detected.outputs[0].token_ids[0]]
        try:
            prompts = tr.window_prompts(tokenizer, features, language, task, timestamps=fmt != "json" and fmt != "text")
        except ValueError as e:
            raise RequestError(f"language: {e}", "language") from None
        params = SamplingParams(temperature=temperature, max_tokens=None, skip_special_tokens=True)
        finals = await self.collect(request, await self.start(request_id, prompts, params))
        result = tr.assemble(tokenizer, [f.outputs[0].token_ids for f in finals], language,
                             audio_io.duration(samples), timestamps=fmt not in ("json", "text"))
        if fmt == "text":
            return Response(result.text, media_type="text/plain")
        if fmt in ("srt", "vtt"):
            return Response(tr.subtitles(result.segments, fmt), media_type="text/plain")
        if fmt == "verbose_json":
            return {"task": task, "language": language, "duration": result.duration, "text": result.text,
                    "segments": [{"id": i, **s} for i, s in enumerate(result.segments)], "model": model}
        return {"text": result.text}

    async def models(self, request: Request):
        data = [{"id": name, "object": "model", "created": self.created, "owned_by": "kiln",
                 "root": self.model_path or name, "parent": None, "max_model_len": self.llm.max_model_len}
                for name in self.names]
        return {"object": "list", "data": data}


class _ChoiceState:
    """How much of one choice a stream has sent."""

    def __init__(self):
        self.sent = 0  # characters of text
        self.num_tokens = 0
        self.finished = False
        self.echoed = False
        self.offset = 0  # text offset of the next chunk (completions logprobs)

    def advance(self, c: CompletionOutput, holdback: int) -> tuple[str, int] | None:
        """The next text delta and the index of its first token, or None when there is nothing new
        to send. New tokens are sent even when their text is still empty (part of a multi-byte
        character), so the client sees the first token when it comes. Until the choice finishes,
        the last `holdback` characters wait: they may be the start of a stop string that the final
        text will not contain."""
        if self.finished:
            return None
        done = c.finish_reason is not None
        visible = c.text if done else c.text[:max(len(c.text) - holdback, self.sent)]
        text = visible[self.sent:]
        if not text and not done and len(c.token_ids) == self.num_tokens:
            return None
        start = self.num_tokens
        self.sent, self.num_tokens, self.finished = len(visible), len(c.token_ids), done
        return text, start


def _check_score_lengths(engine, first: list[str], second: list[str], fields: tuple[str, str],
                         first_single: bool) -> None:
    """Raise a RequestError naming the field of the first text (or pair) longer than max_model_len."""
    limit = engine.max_model_len
    hint = "; pass truncate_prompt_tokens to truncate it"
    if "classify" in engine.tasks:  # a cross-encoder reads each pair as one input
        for i, prompt in enumerate(cross_encoder_prompts(engine, first, second, None)):
            n = len(prompt["prompt_token_ids"])
            if n > limit:
                raise RequestError(f"the pair ({fields[0]}, {fields[1]}[{i}]) has {n} tokens, more than "
                                   f"max_model_len={limit}{hint}", f"{fields[1]}[{i}]")
        return
    if engine.tokenizer is None:
        return
    for k, (texts, single) in enumerate(((first[:1] if first_single else first, first_single), (second, False))):
        for i, ids in enumerate(engine.tokenizer(texts).input_ids):
            if len(ids) > limit:
                field = fields[k] if single else f"{fields[k]}[{i}]"
                raise RequestError(f"{field} has {len(ids)} tokens, more than max_model_len={limit}{hint}", field)


def _counts(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _usage(finals: list[RequestOutput]) -> dict:
    return _counts(sum(len(o.prompt_token_ids) for o in finals),
                   sum(len(c.token_ids) for o in finals for c in o.outputs))


def _top(entry: dict, k: int) -> list:
    return sorted((lp for lp in entry.values() if lp.rank is not None and lp.rank <= k), key=lambda lp: lp.rank)


def _completion_logprobs(c: CompletionOutput, start: int, end: int, k: int, offset: int) -> dict:
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for tid, entry in zip(c.token_ids[start:end], (c.logprobs or [])[start:end]):
        chosen = entry[tid]
        token = chosen.decoded_token or ""
        tokens.append(token)
        token_logprobs.append(chosen.logprob)
        top_logprobs.append({lp.decoded_token or "": lp.logprob for lp in _top(entry, k)})
        offsets.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def _chat_logprobs(c: CompletionOutput, start: int, end: int, k: int) -> list[dict]:
    def item(lp) -> dict:
        token = lp.decoded_token or ""
        return {"token": token, "logprob": lp.logprob, "bytes": list(token.encode("utf-8"))}

    content = []
    for tid, entry in zip(c.token_ids[start:end], (c.logprobs or [])[start:end]):
        content.append({**item(entry[tid]), "top_logprobs": [item(lp) for lp in _top(entry, k)]})
    return content


async def _merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(stream index, output) from several streams as they come."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def drain(i: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                queue.put_nowait((i, out))
            queue.put_nowait((i, done))
        except Exception as e:  # noqa: BLE001 - re-raised by the consumer
            queue.put_nowait((i, e))

    tasks = [asyncio.ensure_future(drain(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _unless_disconnected(request: Request, work):
    """Await `work`, unless the client goes away first: then cancel it and raise _ClientGone.
    (A streamed response needs no watch: Starlette cancels it when the client disconnects.)"""
    work = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            raise _ClientGone()
        return work.result()
    finally:
        gone.cancel()
        work.cancel()


class _ClientGone(Exception):
    """The client closed the connection before its response was ready."""


def _sse(chunks: AsyncIterator[dict], streams: list[RequestStream]) -> StreamingResponse:
    """Server-sent events: one `data: {json}` event per chunk, then `data: [DONE]`. An error after
    the stream has started is sent as a `data: {"error": ...}` event. When the client disconnects,
    Starlette cancels this generator and the requests are aborted."""
    async def events():
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        except Exception as e:  # noqa: BLE001
            logger.warning("kiln: stream failed: %s", e)
            yield f"data: {json.dumps(_error_body(e)[1])}\n\n"
        finally:
            for s in streams:
                s.abort()
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _route(handler):
    """Run a handler; turn its result into JSON and its exceptions into OpenAI-shaped errors."""
    @functools.wraps(handler)
    async def run(request: Request):
        try:
            result = await handler(request)
        except _ClientGone:
            return Response(status_code=499)  # nobody reads it
        except Exception as e:  # noqa: BLE001
            status, body = _error_body(e)
            if status >= 500:
                logger.exception("kiln: %s %s failed", request.method, request.url.path)
            return JSONResponse(body, status_code=status)
        return result if isinstance(result, Response) else JSONResponse(result)

    return run


def build_app(async_llm: AsyncLLM, served_model_name: str | list[str], api_key: str | None = None,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, model_path: str | None = None) -> FastAPI:
    """The server's ASGI app. `served_model_name`: the name(s) clients pass as `model` (the first is
    the one responses carry when a request names none). `async_llm`: an AsyncLLM, or the
    AsyncLLMReplicas that `AsyncLLM.from_config(..., data_parallel_size=M)` returns."""
    names = [served_model_name] if isinstance(served_model_name, str) else list(served_model_name)
    if not names:
        raise ValueError("served_model_name needs at least one name")
    h = _Handlers(async_llm, names, max_body_bytes, model_path)
    metrics = Metrics(async_llm, names[0])
    app = FastAPI(title="kiln", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.handlers, app.state.metrics, app.state.llm = h, metrics, async_llm

    post = [("/v1/completions", h.completions), ("/v1/chat/completions", h.chat), ("/v1/embeddings", h.embeddings),
            ("/score", h.score), ("/v1/score", h.score), ("/rerank", h.rerank), ("/v1/rerank", h.rerank),
            ("/v2/rerank", h.rerank), ("/classify", h.classify), ("/v1/audio/transcriptions", h.transcriptions),
            ("/v1/audio/translations", h.translations)]
    for path, handler in post:
        app.add_api_route(path, _route(handler), methods=["POST"])
    app.add_api_route("/v1/models", _route(h.models), methods=["GET"])

    @app.get("/health")
    async def health():
        if not async_llm.is_alive:
            return _error(503, "the engine loop is not running")
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        message = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return _error(e.status_code, message)

    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=max_body_bytes)
    return app


def serve(async_llm: AsyncLLM, served_model_name: str | list[str], host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, model_path: str | None = None,
          log_level: str = "info") -> None:
    """Run the server until interrupted, then stop the engine loop."""
    import uvicorn

    app = build_app(async_llm, served_model_name, api_key, max_body_bytes, model_path)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level)
    finally:
        async_llm.shutdown()
