"""PoolerConfig (per model) and PoolingParams (per request), with vLLM's names."""

from __future__ import annotations

from dataclasses import dataclass, field

POOLING_TYPES = ("LAST", "MEAN", "CLS", "ALL", "STEP")
POOLING_TASKS = ("embed", "classify", "score", "token_classify", "reward", "encode")


@dataclass
class PoolerConfig:
    """How a pooling model turns hidden states into outputs; None fields take the model's defaults
    (then the checkpoint's sentence-transformers config)."""

    pooling_type: str | None = None
    normalize: bool | None = None
    softmax: bool | None = None
    step_tag_id: int | None = None
    returned_token_ids: list[int] | None = None

    def __post_init__(self) -> None:
        if self.pooling_type is not None:
            self.pooling_type = self.pooling_type.upper()
            if self.pooling_type not in POOLING_TYPES:
                raise ValueError(f"PoolerConfig.pooling_type must be one of {', '.join(POOLING_TYPES)}, "
                                 f"got {self.pooling_type!r}")

    @classmethod
    def coerce(cls, value) -> "PoolerConfig":
        if value is None:
            return cls()
        if isinstance(value, dict):
            return cls(**value)
        if isinstance(value, cls):
            return value
        raise ValueError(f"pooler_config must be a PoolerConfig or a dict, got {type(value).__name__}")


@dataclass
class PoolingParams:
    """Per-request pooling options. `dimensions` truncates embeddings (Matryoshka models);
    `normalize` (embed) and `activation` (classify, score) default to on."""

    dimensions: int | None = None
    normalize: bool | None = None
    activation: bool | None = None
    truncate_prompt_tokens: int | None = None
    task: str | None = field(default=None, repr=False)  # set by the LLM method that sends it

    def __post_init__(self) -> None:
        if self.dimensions is not None and (not isinstance(self.dimensions, int) or self.dimensions < 1):
            raise ValueError(f"PoolingParams.dimensions must be a positive integer, got {self.dimensions!r}")
        t = self.truncate_prompt_tokens
        if t is not None and (not isinstance(t, int) or (t < 1 and t != -1)):
            raise ValueError(f"PoolingParams.truncate_prompt_tokens must be -1 or >= 1, got {t!r}")
        if self.task is not None and self.task not in POOLING_TASKS:
            raise ValueError(f"pooling task must be one of {', '.join(POOLING_TASKS)}, got {self.task!r}")

    def clone(self, **changes) -> "PoolingParams":
        from dataclasses import replace

        return replace(self, **changes)
