"""The audio front end: decode (soundfile), down-mix to mono, resample to 16 kHz (scipy's
polyphase filter), cut into 30-second windows, and log-mel features through transformers'
WhisperFeatureExtractor. Bad audio is a ValueError naming the problem."""

from __future__ import annotations

import io
import math
import os
from fractions import Fraction

import numpy as np
import torch

SAMPLE_RATE = 16000
WINDOW_SECONDS = 30


def load_audio(source, sample_rate: int | None = None) -> np.ndarray:
    """A path, bytes, a file-like object, or an array ([samples] or [samples, channels], with
    `sample_rate`) -> float32 mono samples at 16 kHz."""
    if isinstance(source, tuple) and len(source) == 2:  # vLLM's (waveform, sample_rate)
        source, sample_rate = source
    if isinstance(source, (str, os.PathLike, bytes, bytearray)) or hasattr(source, "read"):
        import soundfile

        if isinstance(source, (bytes, bytearray)):
            if len(source) == 0:
                raise ValueError("the audio is empty (0 bytes)")
            source = io.BytesIO(source)
        try:
            samples, sample_rate = soundfile.read(source, dtype="float32", always_2d=True)
        except (soundfile.LibsndfileError, RuntimeError, TypeError) as e:
            raise ValueError(f"cannot decode the audio ({e}); supported containers: wav, flac, ogg") from e
    else:
        if sample_rate is None:
            raise ValueError("an audio array needs its sample_rate")
        samples = np.asarray(source.numpy() if isinstance(source, torch.Tensor) else source, dtype=np.float32)
    if not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive integer, got {sample_rate!r}")
    if samples.ndim == 2:  # [samples, channels] -> mono
        samples = samples.mean(axis=1)
    if samples.ndim != 1:
        raise ValueError(f"audio must be [samples] or [samples, channels], got shape {samples.shape}")
    if samples.size == 0:
        raise ValueError("the audio has no samples")
    if not np.isfinite(samples).all():
        raise ValueError("the audio holds NaN or infinite samples")
    if sample_rate != SAMPLE_RATE:
        from scipy.signal import resample_poly

        ratio = Fraction(SAMPLE_RATE, int(sample_rate))
        samples = resample_poly(samples, ratio.numerator, ratio.denominator).astype(np.float32)
    return samples


def windows(samples: np.ndarray) -> list[np.ndarray]:
    """Consecutive 30-second windows (the last one shorter)."""
    size = SAMPLE_RATE * WINDOW_SECONDS
    return [samples[i:i + size] for i in range(0, max(len(samples), 1), size)]


def log_mel(feature_extractor, samples: np.ndarray) -> torch.Tensor:
    """One window of at most 30 s -> features [num_mel_bins, 3000] (padded as Whisper expects)."""
    if len(samples) > SAMPLE_RATE * WINDOW_SECONDS:
        raise ValueError(f"audio of {len(samples) / SAMPLE_RATE:.1f} s is longer than one {WINDOW_SECONDS} s window: "
                         "use LLM.transcribe, which splits it")
    out = feature_extractor(samples, sampling_rate=SAMPLE_RATE, return_tensors="pt")
    return out.input_features[0]


def duration(samples: np.ndarray) -> float:
    return len(samples) / SAMPLE_RATE


def num_windows(seconds: float) -> int:
    return max(1, math.ceil(seconds / WINDOW_SECONDS))
