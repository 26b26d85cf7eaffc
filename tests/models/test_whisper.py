"""Whisper against HF transformers on a tiny random checkpoint and synthetic audio: identical
greedy tokens for a short clip, a batch of clips of different lengths and a 60-second clip cut
into windows; audio containers and bad audio handled."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

from kiln import LLM, SamplingParams
from kiln.runtime.audio import load_audio
from kiln.runtime.demo import build_whisper_checkpoint

PROMPT = "<|startoftranscript|><|en|><|transcribe|><|notimestamps|>"
NEW_TOKENS = 16


def clip(seconds: float, freq: float = 440.0, seed: int = 0, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    noise = np.random.default_rng(seed).standard_normal(len(t))
    return (0.3 * np.sin(2 * np.pi * freq * t) + 0.05 * noise).astype(np.float32)


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return build_whisper_checkpoint(str(tmp_path_factory.mktemp("whisper") / "tiny"))


@pytest.fixture(scope="module")
def llm(path):
    return LLM(path)


@pytest.fixture(scope="module")
def hf(path):
    return WhisperForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()


def hf_tokens(hf, path, samples: np.ndarray, prompt_ids: list[int]) -> list[int]:
    features = WhisperFeatureExtractor.from_pretrained(path)(samples, sampling_rate=16000, return_tensors="pt").input_features
    out = hf.generate(features, decoder_input_ids=torch.tensor([prompt_ids]), max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, -NEW_TOKENS:].tolist() if out.shape[1] > NEW_TOKENS else out[0].tolist()


def greedy() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


def test_short_clip_and_batch_of_lengths_match_hf(llm, hf, path):
    clips = [clip(3.0), clip(1.5, 300.0, 1), clip(7.0, 880.0, 2), clip(13.0, 200.0, 3)]
    prompts = [{"prompt": PROMPT, "multi_modal_data": {"audio": (c, 16000)}} for c in clips]
    outs = llm.generate(prompts, greedy(), use_tqdm=False)  # one batch: the encoders run together
    for c, out in zip(clips, outs):
        assert out.outputs[0].token_ids == hf_tokens(hf, path, c, out.prompt_token_ids)


def test_encoder_decoder_prompt_form(llm, hf, path):
    c = clip(2.0, 500.0, 4)
    out = llm.generate({"encoder_prompt": {"prompt": "", "multi_modal_data": {"audio": (c, 16000)}},
                        "decoder_prompt": PROMPT}, greedy(), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == hf_tokens(hf, path, c, out.prompt_token_ids)


def test_sixty_second_clip_is_windowed(llm, hf, path):
    long = np.concatenate([clip(30.0, 440.0, 5), clip(30.0, 660.0, 6)])
    result = llm.transcribe(long, sample_rate=16000, language="en", use_tqdm=False,
                            sampling_params=greedy())
    assert result.duration == pytest.approx(60.0) and len(result.token_ids) == 2
    prefix = llm.get_tokenizer().convert_tokens_to_ids(["<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"])
    for w, tokens in enumerate(result.token_ids):
        assert tokens == hf_tokens(hf, path, long[w * 480000:(w + 1) * 480000], prefix)


def test_language_detection_and_translate(llm, hf, path):
    c = clip(4.0, 350.0, 7)
    result = llm.transcribe(c, sample_rate=16000, use_tqdm=False)
    features = WhisperFeatureExtractor.from_pretrained(path)(c, sampling_rate=16000, return_tensors="pt").input_features
    tok = llm.get_tokenizer()
    logits = hf(input_features=features, decoder_input_ids=torch.tensor([[tok.convert_tokens_to_ids("<|startoftranscript|>")]])).logits[0, -1]
    lang_ids = {tok.convert_tokens_to_ids(f"<|{x}|>"): x for x in ("en", "de", "fr", "es")}
    expected = lang_ids[max(lang_ids, key=lambda t: logits[t].item())]
    assert result.language == expected
    translated = llm.transcribe(c, sample_rate=16000, language="de", task="translate", use_tqdm=False,
                                sampling_params=greedy())
    prefix = tok.convert_tokens_to_ids(["<|startoftranscript|>", "<|de|>", "<|translate|>", "<|notimestamps|>"])
    assert translated.token_ids[0] == hf_tokens(hf, path, c, prefix)
    with pytest.raises(ValueError, match="no <|xx|> token"):
        llm.transcribe(c, sample_rate=16000, language="xx", use_tqdm=False)


# wav (float) is exact and flac (24-bit) nearly so; vorbis is lossy, so it is held to the mean error
@pytest.mark.parametrize("fmt, subtype, atol, mean_tol", [("WAV", "FLOAT", 1e-6, 1e-7), ("FLAC", "PCM_24", 1e-3, 1e-4),
                                                          ("OGG", "VORBIS", None, 0.05)])
def test_containers_decode_to_the_array_features(fmt, subtype, atol, mean_tol, path):
    import soundfile

    c = clip(2.0, 440.0, 8)
    buf = io.BytesIO()
    soundfile.write(buf, c, 16000, format=fmt, subtype=subtype)
    fe = WhisperFeatureExtractor.from_pretrained(path)
    from_file = fe(load_audio(buf.getvalue()), sampling_rate=16000, return_tensors="np").input_features
    from_array = fe(c, sampling_rate=16000, return_tensors="np").input_features
    assert np.abs(from_file - from_array).mean() < mean_tol
    if atol is not None:
        np.testing.assert_allclose(from_file, from_array, atol=atol)


def test_resampling_and_stereo():
    rate = 8000
    c8k = clip(1.0, 440.0, 9, rate=rate)
    resampled = load_audio(c8k, sample_rate=rate)
    assert resampled.shape == (16000,) and resampled.dtype == np.float32
    stereo = np.stack([c8k, np.zeros_like(c8k)], axis=1)
    np.testing.assert_allclose(load_audio(stereo, sample_rate=rate), load_audio(c8k / 2, sample_rate=rate), atol=1e-6)


@pytest.mark.parametrize("audio, match", [
    (b"not an audio file at all", "cannot decode"),
    (b"", "empty"),
    ((np.zeros(0, dtype=np.float32), 16000), "no samples"),
    ((np.zeros(100, dtype=np.float32), -5), "sample_rate"),
    ((np.full(100, np.nan, dtype=np.float32), 16000), "NaN"),
])
def test_bad_audio_is_a_clear_error_and_the_engine_keeps_serving(llm, audio, match):
    with pytest.raises(ValueError, match=match):
        llm.generate({"prompt": PROMPT, "multi_modal_data": {"audio": audio}}, greedy(), use_tqdm=False)
    with pytest.raises(ValueError, match=match):
        llm.transcribe(audio if not isinstance(audio, tuple) else audio[0],
                       sample_rate=None if not isinstance(audio, tuple) else audio[1], use_tqdm=False)
    out = llm.generate({"prompt": PROMPT, "multi_modal_data": {"audio": (clip(1.0), 16000)}}, greedy(), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == NEW_TOKENS
    assert llm.llm_engine.scheduler.cross_slots.num_free == len(llm.llm_engine.runner.cross_kv_caches[0][0])


def test_generate_needs_audio_and_long_audio_needs_transcribe(llm):
    with pytest.raises(ValueError, match="transcribes audio"):
        llm.generate(PROMPT, greedy(), use_tqdm=False)
    with pytest.raises(ValueError, match="longer than one 30 s window"):
        llm.generate({"prompt": PROMPT, "multi_modal_data": {"audio": (clip(31.0), 16000)}}, greedy(), use_tqdm=False)
