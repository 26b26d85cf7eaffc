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


class FinalDetokenizer:
    """The text of a request that is read only once it finishes (`RequestOutputKind.FINAL_ONLY`,
    no stop strings): nothing per token; one decode of the whole output, after the prompt's last
    tokens as context, when the text is asked for. That is IncrementalDetokenizer's text, whose
    deltas are that decode cut up (for a byte-level BPE tokenizer, 3000 random and 3000 real token
    streams gave the same text; tests/runtime/test_detokenizer.py), except where the output ends
    inside a character: the incremental text leaves those bytes out, the one decode shows U+FFFD,
    so then the incremental algorithm runs over the output instead. Only for tokenizers whose Rust
    decode is the whole of their decode (`_rust_decode`); `output_token_ids`: the request's own
    list, read when the text is."""

    def __init__(self, tokenizer, prompt_token_ids: list[int], output_token_ids: list[int], decode, skip_special_tokens: bool):
        self.tokenizer, self.decode, self.skip_special_tokens = tokenizer, decode, skip_special_tokens
        self.context, self.output = list(prompt_token_ids[-_CONTEXT:]), output_token_ids
        self._text, self._decoded = "", 0  # the text of the first `_decoded` output tokens

    def add(self, token_id: int) -> str:
        return ""

    @property
    def text(self) -> str:
        if self._decoded != len(self.output):
            ids, self._decoded = list(self.output), len(self.output)
            text = self.decode(self.context + ids)[len(self.decode(self.context)):]
            if text.endswith("\ufffd"):
                incremental = IncrementalDetokenizer(self.tokenizer, self.context, self.skip_special_tokens)
                text = "".join(incremental.add(t) for t in ids)
            self._text = text
        return self._text


def make_detokenizer(tokenizer, prompt_token_ids: list[int], output_token_ids: list[int], params):
    """The detokenizer a request needs: FinalDetokenizer when only its final text is read and the
    tokenizer allows (see there), else IncrementalDetokenizer."""
    from kiln.runtime.sampling_params import RequestOutputKind

    if (params.output_kind is RequestOutputKind.FINAL_ONLY and not params.stop
            and params.spaces_between_special_tokens):
        decode = _rust_decode(tokenizer, params.skip_special_tokens)
        if decode is not None:
            return FinalDetokenizer(tokenizer, prompt_token_ids, output_token_ids, decode, params.skip_special_tokens)
    return IncrementalDetokenizer(tokenizer, prompt_token_ids, params.skip_special_tokens,
                                  params.spaces_between_special_tokens)


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
