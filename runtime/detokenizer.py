"""Incremental detokenization and stop strings.

Each step decodes a short window of recent tokens twice (without and with the new ones) and
appends the difference, so multi-token characters and word-boundary spaces come out right
without re-decoding the whole output. A window ending in U+FFFD waits for more bytes.
"""

from __future__ import annotations

_CONTEXT = 6  # prompt tokens the window starts with, so the first output token decodes in context


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True,
                 spaces_between_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.kwargs = {"skip_special_tokens": skip_special_tokens}
        if not spaces_between_special_tokens:
            self.kwargs["spaces_between_special_tokens"] = False
        self.decode = _rust_decode(tokenizer, skip_special_tokens) if spaces_between_special_tokens else None
        if self.decode is None:
            self.decode = lambda ids: tokenizer.decode(ids, **self.kwargs)
        self.ids = list(prompt_token_ids[-_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes (possibly empty)."""
        self.ids.append(token_id)
        prefix = self.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self.text += delta
            return delta
        return ""

    def decode_token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


def _rust_decode(tokenizer, skip_special_tokens: bool):
    """The Rust tokenizer's own decode, when the transformers tokenizer's `decode` would return
    exactly its output (a fast tokenizer that overrides neither decode nor _decode and does no
    clean-up of spaces): a third of the cost per call, twice per generated token. Else None."""
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return None
    cls = type(tokenizer)
    if (not isinstance(tokenizer, TokenizersBackend) or cls._decode is not TokenizersBackend._decode
            or cls.decode is not PreTrainedTokenizerBase.decode or getattr(tokenizer, "clean_up_tokenization_spaces", True)):
        return None
    backend = tokenizer._tokenizer
    return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)


def find_stop(text: str, new_len: int, stops: list[str], include: bool) -> tuple[str, str] | None:
    """If a stop string appears in `text` overlapping its last `new_len` chars, return (text cut
    at the stop, the stop string); the earliest occurrence wins."""
    best = None
    for stop in stops:
        start = max(len(text) - new_len - len(stop) + 1, 0)
        at = text.find(stop, start)
        if at != -1 and (best is None or at < best[0]):
            best = (at, stop)
    if best is None:
        return None
    at, stop = best
    return text[: at + len(stop) if include else at], stop
