"""Request bodies of the HTTP server as pydantic models, with OpenAI's field names (and vLLM's extra
sampling fields), and their translation into SamplingParams / PoolingParams.

Bodies are validated strictly: a field of the wrong JSON type is an error (no "5" -> 5), and an
unknown field is an error naming it. Every optional field also takes null, as OpenAI's API does.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kiln.runtime.pooling_params import PoolingParams
from kiln.runtime.sampling_params import SamplingParams

MAX_N = 16  # choices per request (`n`)
MAX_LOGPROBS = 20  # `logprobs` (completions) and `top_logprobs` (chat)

TokenIds = list[Annotated[int, Field(ge=0)]]


class RequestError(ValueError):
    """A request the server refuses: the HTTP status, the message and the field it names."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.type = message, param, status, code, type


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None  # vLLM: usage in every chunk


class _Sampling(_Body):
    """The sampling fields completions and chat share."""

    model: str | None = None
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    max_tokens: int | None = Field(None, ge=1)
    n: int | None = Field(None, ge=1, le=MAX_N)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    user: str | None = None
    # vLLM's extra sampling fields (the openai client sends them through extra_body)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    min_tokens: int | None = Field(None, ge=0)
    ignore_eos: bool | None = None
    stop_token_ids: TokenIds | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        if self.logit_bias:
            raise RequestError("logit_bias is not supported", "logit_bias")
        if self.stop is not None and any(not s for s in ([self.stop] if isinstance(self.stop, str) else self.stop)):
            raise RequestError("stop strings must not be empty", "stop")
        given = {
            "n": self.n, "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty, "temperature": self.temperature, "top_p": self.top_p,
            "top_k": self.top_k, "min_p": self.min_p, "seed": self.seed, "stop": self.stop,
            "stop_token_ids": self.stop_token_ids, "ignore_eos": self.ignore_eos, "min_tokens": self.min_tokens,
            "skip_special_tokens": self.skip_special_tokens,
            "spaces_between_special_tokens": self.spaces_between_special_tokens,
            "include_stop_str_in_output": self.include_stop_str_in_output,
        }
        kwargs = {k: v for k, v in given.items() if v is not None}
        try:
            return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, **kwargs)
        except ValueError as e:  # "SamplingParams.<field> must be ..."
            message = str(e)
            param = message.split(".", 1)[1].split(" ", 1)[0] if message.startswith("SamplingParams.") else None
            raise RequestError(message.replace("SamplingParams.", ""), param) from None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)

    def check_stream_options(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise RequestError("stream_options is only allowed when stream is true", "stream_options")


class CompletionRequest(_Sampling):
    prompt: str | list[str] | TokenIds | list[TokenIds]
    best_of: int | None = Field(None, ge=1)
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: str | None = None

    def prompts(self) -> list:
        """The prompt(s): strings, or {"prompt_token_ids": [...]} dicts."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise RequestError("prompt must not be empty", "prompt")
        if isinstance(p[0], str):
            return list(p)
        if isinstance(p[0], int):
            return [{"prompt_token_ids": list(p)}]
        return [{"prompt_token_ids": list(ids)} for ids in p]

    def to_sampling_params(self) -> SamplingParams:
        self.check_stream_options()
        if self.suffix:
            raise RequestError("suffix is not supported", "suffix")
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise RequestError(f"best_of={self.best_of} is not supported: kiln returns all n choices it samples "
                               "(leave best_of unset or equal to n)", "best_of")
        if self.echo and self.logprobs is not None:
            raise RequestError("echo with logprobs is not supported (prompt logprobs are not returned)", "echo")
        return self.sampling_params(16 if self.max_tokens is None else self.max_tokens, self.logprobs)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[dict] | None = None

    def as_dict(self) -> dict:
        content = self.content
        if isinstance(content, list):
            content = "\n".join(part.text for part in content)
        out = {"role": self.role, "content": content if content is not None else ""}
        for name in ("name", "tool_call_id", "tool_calls"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    max_completion_tokens: int | None = Field(None, ge=1)
    response_format: dict | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    # vLLM's chat fields
    chat_template: str | None = None
    chat_template_kwargs: dict | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None

    def to_sampling_params(self) -> SamplingParams:
        self.check_stream_options()
        if self.tools:
            raise RequestError("tools are not supported", "tools")
        if self.tool_choice not in (None, "none", "auto"):
            raise RequestError("tool_choice is not supported", "tool_choice")
        if self.response_format and self.response_format.get("type") != "text":
            raise RequestError("response_format other than {'type': 'text'} is not supported", "response_format")
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("top_logprobs needs logprobs=true", "top_logprobs")
        if self.add_generation_prompt and self.continue_final_message:
            raise RequestError("add_generation_prompt and continue_final_message cannot both be true",
                               "continue_final_message")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self.sampling_params(max_tokens, (self.top_logprobs or 0) if self.logprobs else None)


class _Pooling(_Body):
    model: str | None = None
    user: str | None = None
    truncate_prompt_tokens: int | None = Field(None, ge=-1)

    def check_truncate(self) -> None:
        if self.truncate_prompt_tokens == 0:
            raise RequestError("truncate_prompt_tokens must be -1 (max_model_len) or >= 1", "truncate_prompt_tokens")


def _inputs(value, name: str) -> list:
    if isinstance(value, str):
        return [value]
    if not value:
        raise RequestError(f"{name} must not be empty", name)
    if isinstance(value[0], int):
        return [{"prompt_token_ids": list(value)}]
    if isinstance(value[0], str):
        return list(value)
    return [{"prompt_token_ids": list(ids)} for ids in value]


class EmbeddingRequest(_Pooling):
    input: str | list[str] | TokenIds | list[TokenIds]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(None, ge=1)

    def inputs(self) -> list:
        return _inputs(self.input, "input")

    def pooling_params(self) -> PoolingParams:
        self.check_truncate()
        return PoolingParams(dimensions=self.dimensions, truncate_prompt_tokens=self.truncate_prompt_tokens, task="embed")


class ClassificationRequest(_Pooling):
    input: str | list[str] | TokenIds | list[TokenIds]

    def inputs(self) -> list:
        return _inputs(self.input, "input")

    def pooling_params(self) -> PoolingParams:
        self.check_truncate()
        return PoolingParams(truncate_prompt_tokens=self.truncate_prompt_tokens, task="classify")


class ScoreRequest(_Pooling):
    text_1: str | list[str]
    text_2: str | list[str]

    def pairs(self) -> tuple[list[str], list[str]]:
        first = [self.text_1] if isinstance(self.text_1, str) else list(self.text_1)
        second = [self.text_2] if isinstance(self.text_2, str) else list(self.text_2)
        if not first:
            raise RequestError("text_1 must not be empty", "text_1")
        if not second:
            raise RequestError("text_2 must not be empty", "text_2")
        if len(first) == 1:
            first = first * len(second)
        if len(first) != len(second):
            raise RequestError(f"text_1 has {len(first)} texts and text_2 {len(second)}: give one text against many, "
                               "or two lists of the same length", "text_2")
        return first, second


class RerankRequest(_Pooling):
    query: str
    documents: list[str] = Field(min_length=1)
    top_n: int | None = Field(None, ge=0)  # 0 or null: all documents
    return_documents: bool | None = None


# ---------------------------------------------------------------- validation errors


def _param(loc: tuple) -> str:
    """A pydantic error location as a field path ("messages[0].role"), without the union-branch tags
    pydantic adds ("str", "list[int]", "function-after[...]")."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part.isidentifier() and part not in ("str", "int", "float", "bool", "list", "dict", "none"):
            path += f".{part}" if path else part
    return path


def validation_error(error: ValidationError) -> RequestError:
    errors = error.errors(include_url=False)
    if errors and errors[0]["type"] == "json_invalid":
        return RequestError(f"malformed JSON body: {errors[0]['msg']}", None)
    if errors and not errors[0]["loc"] and errors[0]["type"] == "model_type":
        return RequestError("the body must be a JSON object", None)
    by_param: dict[str, list[str]] = {}
    for e in errors:
        msg = "unknown field" if e["type"] == "extra_forbidden" else e["msg"]
        if e["type"] == "missing":
            msg = "field required"
        msgs = by_param.setdefault(_param(e["loc"]), [])
        if msg not in msgs:
            msgs.append(msg)
    parts = [f"'{p}': {' or '.join(m)}" for p, m in list(by_param.items())[:3]]
    first = next(iter(by_param), None)
    return RequestError("invalid request: " + "; ".join(parts), first or None)
