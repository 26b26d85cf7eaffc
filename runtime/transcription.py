"""Whisper-style transcription, shared by `LLM.transcribe` and the server's /v1/audio endpoints:
the decoder prompts of each 30-second window, language detection, and the output formats."""

from __future__ import annotations

from dataclasses import dataclass

from kiln.runtime import audio as audio_io
from kiln.runtime.sampling_params import SamplingParams


def special_token(tokenizer, name: str) -> int:
    """The id of <|name|> (a language, a task, startoftranscript, notimestamps)."""
    tid = tokenizer.convert_tokens_to_ids(f"<|{name}|>")
    if tid is None or tid == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no <|{name}|> token; languages it knows: {', '.join(languages(tokenizer).values())}")
    return tid


def languages(tokenizer) -> dict[int, str]:
    """Language tokens (<|en|>, <|de|>, ...) by id."""
    return {tid: t[2:-2] for t, tid in tokenizer.get_vocab().items()
            if t.startswith("<|") and t.endswith("|>") and 2 <= len(t) - 4 <= 3 and t[2:-2].isalpha() and t[2:-2].islower()}


def detection_request(tokenizer, features) -> tuple[dict, SamplingParams]:
    """One decoder step after <|startoftranscript|>, restricted to the language tokens."""
    langs = languages(tokenizer)
    if not langs:
        raise ValueError("the tokenizer has no language tokens: pass a language")
    params = SamplingParams(temperature=0.0, max_tokens=1, allowed_token_ids=sorted(langs))
    return {"prompt_token_ids": [special_token(tokenizer, "startoftranscript")], "encoder_input": features}, params


def window_prompts(tokenizer, features: list, language: str, task: str, timestamps: bool) -> list[dict]:
    if task not in ("transcribe", "translate"):
        raise ValueError(f"task must be 'transcribe' or 'translate', got {task!r}")
    prefix = [special_token(tokenizer, "startoftranscript"), special_token(tokenizer, language),
              special_token(tokenizer, task)] + ([] if timestamps else [special_token(tokenizer, "notimestamps")])
    return [{"prompt_token_ids": prefix, "encoder_input": f} for f in features]


def features_of(feature_extractor, samples) -> list:
    return [audio_io.log_mel(feature_extractor, w) for w in audio_io.windows(samples)]


@dataclass
class Transcription:
    """What `LLM.transcribe` returns for one audio input."""

    text: str
    language: str
    duration: float  # seconds of audio
    segments: list[dict] | None = None  # with timestamps: [{"start", "end", "text"}], seconds
    token_ids: list[list[int]] | None = None  # per 30-second window


def assemble(tokenizer, windows: list[list[int]], language: str, duration: float, timestamps: bool) -> Transcription:
    """The text of each window's tokens (timestamp tokens dropped), joined; segments if asked."""
    ts_begin = tokenizer.convert_tokens_to_ids("<|0.00|>")
    texts = [tokenizer.decode([t for t in ids if t < ts_begin], skip_special_tokens=True).strip() for ids in windows]
    segments = _segments(tokenizer, windows, ts_begin) if timestamps else None
    return Transcription(" ".join(t for t in texts if t), language, duration, segments, windows)


def _segments(tokenizer, windows: list[list[int]], ts_begin: int) -> list[dict]:
    """Text between two timestamp tokens, offset by its window's start."""
    segments = []
    for w, ids in enumerate(windows):
        offset, start, text_ids = 30.0 * w, None, []
        for tid in ids:
            if tid >= ts_begin:
                t = offset + (tid - ts_begin) * 0.02
                if start is None:
                    start = t
                else:
                    segments.append({"start": round(start, 2), "end": round(t, 2),
                                     "text": tokenizer.decode(text_ids, skip_special_tokens=True)})
                    start, text_ids = None, []
            elif tid < len(tokenizer):
                text_ids.append(tid)
        if text_ids:
            segments.append({"start": round(start if start is not None else offset, 2), "end": round(offset + 30.0, 2),
                             "text": tokenizer.decode(text_ids, skip_special_tokens=True)})
    return segments


def _clock(seconds: float, separator: str) -> str:
    ms = int(round(seconds * 1000))
    return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d}{separator}{ms % 1000:03d}"


def subtitles(segments: list[dict], fmt: str) -> str:
    """SRT or WebVTT text of timestamped segments."""
    if fmt == "srt":
        return "\n".join(f"{i}\n{_clock(s['start'], ',')} --> {_clock(s['end'], ',')}\n{s['text'].strip()}\n"
                         for i, s in enumerate(segments, start=1))
    return "WEBVTT\n\n" + "\n".join(f"{_clock(s['start'], '.')} --> {_clock(s['end'], '.')}\n{s['text'].strip()}\n"
                                    for s in segments)
