"""Output objects with vLLM's names: RequestOutput, CompletionOutput, Logprob."""

from __future__ import annotations

from dataclasses import dataclass, field

# A position's logprobs: {token_id: Logprob}, the chosen token first, then the top-k.
SampleLogprobs = list[dict[int, "Logprob"]]
PromptLogprobs = list["dict[int, Logprob] | None"]


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None  # 1 = the most likely token
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None
    finish_reason: str | None = None  # "stop", "length", "abort"
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: PromptLogprobs | None
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    metrics: dict = field(default_factory=dict, repr=False)


# ---------------------------------------------------------------- pooling outputs (vLLM's names)


@dataclass
class PoolingOutput:
    data: "torch.Tensor"  # noqa: F821 - float32 on CPU: [D] per sequence, or [tokens, D] for ALL/STEP


@dataclass
class PoolingRequestOutput:
    request_id: str
    outputs: PoolingOutput
    prompt_token_ids: list[int]
    finished: bool = True
    prompt: str | None = None


class EmbeddingOutput:
    """vLLM's: `embedding`, the vector as a list of floats. Made from the pooled float32 tensor
    (`data`, kept) when first read, so that an `embed` call of thousands of sentences returns
    without a Python float per element (2048 BERT-base embeddings are 1.5M of them: about 25 ms of
    `tolist` on an H100 host, and lists the garbage collector then walks), which a caller who
    stacks `data` into an array never needs. Either argument makes one."""

    __slots__ = ("data", "_embedding")

    def __init__(self, embedding: list[float] | None = None, data: "torch.Tensor | None" = None):  # noqa: F821
        if (embedding is None) == (data is None):
            raise TypeError("EmbeddingOutput takes one of embedding (a list) or data (a 1-D tensor)")
        self._embedding, self.data = embedding, data

    @property
    def embedding(self) -> list[float]:
        if self._embedding is None:
            self._embedding = self.data.tolist()
        return self._embedding

    @property
    def hidden_size(self) -> int:
        return len(self._embedding) if self.data is None else self.data.shape[-1]

    def __eq__(self, other) -> bool:
        return isinstance(other, EmbeddingOutput) and self.embedding == other.embedding

    def __repr__(self) -> str:
        return f"EmbeddingOutput(hidden_size={self.hidden_size})"


@dataclass
class ClassificationOutput:
    probs: list[float]

    @property
    def num_classes(self) -> int:
        return len(self.probs)


@dataclass
class ScoringOutput:
    score: float


@dataclass
class EmbeddingRequestOutput:
    request_id: str
    outputs: EmbeddingOutput
    prompt_token_ids: list[int]
    finished: bool = True


@dataclass
class ClassificationRequestOutput:
    request_id: str
    outputs: ClassificationOutput
    prompt_token_ids: list[int]
    finished: bool = True


@dataclass
class ScoringRequestOutput:
    request_id: str
    outputs: ScoringOutput
    prompt_token_ids: list[int]
    finished: bool = True
