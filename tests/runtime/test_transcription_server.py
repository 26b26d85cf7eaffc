"""/v1/audio/transcriptions and /translations on a real server with the tiny Whisper checkpoint,
through the official `openai` client: the text equals `LLM.transcribe`'s, every response format,
and bad uploads get 4xx errors while the server keeps serving."""

from __future__ import annotations

import io

import numpy as np
import pytest

openai = pytest.importorskip("openai")
soundfile = pytest.importorskip("soundfile")

from kiln import LLM, SamplingParams  # noqa: E402
from kiln.runtime.async_engine import AsyncLLM  # noqa: E402
from kiln.runtime.config import EngineConfig  # noqa: E402
from kiln.runtime.demo import build_whisper_checkpoint  # noqa: E402

from .test_server import Server  # noqa: E402


def wav(seconds: float, freq: float = 440.0) -> bytes:
    t = np.arange(int(16000 * seconds)) / 16000
    samples = (0.3 * np.sin(2 * np.pi * freq * t) + 0.05 * np.random.default_rng(1).standard_normal(len(t))).astype(np.float32)
    buf = io.BytesIO()
    soundfile.write(buf, samples, 16000, format="WAV", subtype="FLOAT")
    return buf.getvalue()


@pytest.fixture(scope="module")
def whisper_path(tmp_path_factory):
    return build_whisper_checkpoint(str(tmp_path_factory.mktemp("whisper") / "tiny"), max_target_positions=48)


@pytest.fixture(scope="module")
def server(whisper_path):
    s = Server(AsyncLLM.from_config(EngineConfig(model=whisper_path)), "tiny-whisper", max_body=8 << 20)
    yield s
    s.stop()


def test_transcription_equals_llm_transcribe(server, whisper_path):
    audio = wav(3.0)
    got = server.client.audio.transcriptions.create(model="tiny-whisper", file=("clip.wav", audio), language="en")
    expected = LLM(whisper_path).transcribe(audio, language="en", use_tqdm=False,
                                            sampling_params=SamplingParams(temperature=0.0, max_tokens=None))
    assert got.text == expected.text


def test_formats_translation_and_windows(server):
    audio = wav(35.0, 300.0)  # two windows
    verbose = server.client.audio.transcriptions.create(model="tiny-whisper", file=("a.wav", audio),
                                                        response_format="verbose_json")
    assert verbose.duration == pytest.approx(35.0) and verbose.language in ("en", "de", "fr", "es")
    text = server.client.audio.transcriptions.create(model="tiny-whisper", file=("a.wav", audio), response_format="text")
    assert isinstance(text, str)
    for fmt, head in (("srt", None), ("vtt", "WEBVTT")):
        body = server.http.post("/v1/audio/transcriptions", files={"file": ("a.wav", audio)},
                                data={"model": "tiny-whisper", "response_format": fmt})
        assert body.status_code == 200 and (head is None or body.text.startswith(head))
    translated = server.client.audio.translations.create(model="tiny-whisper", file=("a.wav", wav(2.0)))
    assert isinstance(translated.text, str)


@pytest.mark.parametrize("files, data, status, param", [
    ({"file": ("bad.wav", b"this is not audio")}, {"model": "tiny-whisper"}, 400, "file"),
    ({"file": ("empty.wav", b"")}, {"model": "tiny-whisper"}, 400, "file"),
    (None, {"model": "tiny-whisper"}, 400, "file"),
    ({"file": ("a.wav", b"RIFF")}, {"model": "no-such-model"}, 404, "model"),
    ({"file": ("a.wav", b"RIFF")}, {"model": "tiny-whisper", "response_format": "xml"}, 400, "response_format"),
    ({"file": ("a.wav", b"RIFF")}, {"model": "tiny-whisper", "temperature": "-1"}, 400, "temperature"),
])
def test_bad_uploads(server, files, data, status, param):
    if param in ("response_format", "temperature"):
        files = {"file": ("a.wav", wav(1.0))}
    response = server.http.post("/v1/audio/transcriptions", files=files, data=data)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param
    ok = server.client.audio.transcriptions.create(model="tiny-whisper", file=("ok.wav", wav(1.0)), language="en")
    assert isinstance(ok.text, str)


def test_generate_server_refuses_audio(llama_path):
    s = Server(AsyncLLM.from_config(EngineConfig(model=llama_path, max_model_len=64)), "tiny-llama")
    try:
        response = s.http.post("/v1/audio/transcriptions", files={"file": ("a.wav", wav(1.0))}, data={"model": "tiny-llama"})
        assert response.status_code == 400 and "speech-to-text" in response.json()["error"]["message"]
    finally:
        s.stop()
