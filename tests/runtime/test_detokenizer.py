"""Incremental detokenization: the streamed text equals one decode of all output tokens, through
the Rust tokenizer's decode where transformers' would give the same, and through transformers'
where it would not (clean-up of spaces, a WordPiece tokenizer)."""

from __future__ import annotations

import copy
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kiln.runtime.demo import train_tokenizer, train_wordpiece_tokenizer
from kiln.runtime.detokenizer import FinalDetokenizer, IncrementalDetokenizer, _rust_decode, make_detokenizer

BPE = train_tokenizer()
WORDPIECE = train_wordpiece_tokenizer()
CLEANING = copy.deepcopy(WORDPIECE)  # clean_up_tokenization_spaces: transformers edits the Rust output
CLEANING.clean_up_tokenization_spaces = True


def test_the_rust_decode_is_used_only_where_it_is_transformers_decode():
    assert _rust_decode(BPE, True) is not None and _rust_decode(WORDPIECE, False) is not None
    assert _rust_decode(CLEANING, True) is None


@pytest.mark.parametrize("tokenizer", [BPE, WORDPIECE, CLEANING], ids=["bpe", "wordpiece", "cleaning-spaces"])
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), skip=st.booleans())
def test_streamed_text_equals_one_decode(tokenizer, seed, skip):
    rng = random.Random(seed)
    vocab = len(tokenizer)
    prompt = [rng.randrange(vocab) for _ in range(rng.randint(1, 8))]
    output = [rng.randrange(vocab) for _ in range(rng.randint(1, 24))]
    detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip)
    streamed = "".join(detok.add(t) for t in output)
    assert streamed == detok.text
    for n in range(1, len(output) + 1):  # every prefix's decode agrees with transformers' own
        ids = (prompt[-6:] + output[:n])
        assert detok.decode(ids) == tokenizer.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("tokenizer", [BPE, WORDPIECE], ids=["bpe", "wordpiece"])
@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**31), skip=st.booleans())
def test_final_text_equals_the_streamed_text(tokenizer, seed, skip):
    """A request read only when it finishes decodes its output once: the same text as streaming it
    token by token, random ids included (bytes of a character cut at the end: U+FFFD in one decode,
    left out by the stream: the final detokenizer then streams), read again as the output grows."""
    rng = random.Random(seed)
    vocab = len(tokenizer)
    prompt = [rng.randrange(vocab) for _ in range(rng.randint(1, 8))]
    output: list[int] = []
    final = FinalDetokenizer(tokenizer, prompt, output, _rust_decode(tokenizer, skip), skip)
    streamed = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip)
    for _ in range(rng.randint(1, 40)):
        output.append(rng.randrange(vocab))
        streamed.add(output[-1])
        assert final.add(output[-1]) == ""
        if rng.random() < 0.2:
            assert final.text == streamed.text
    assert final.text == streamed.text


def test_which_detokenizer_a_request_gets():
    from kiln.runtime.sampling_params import RequestOutputKind, SamplingParams

    final = SamplingParams(output_kind=RequestOutputKind.FINAL_ONLY)
    assert isinstance(make_detokenizer(BPE, [1, 2], [], final), FinalDetokenizer)
    for params in (SamplingParams(), final.clone(stop=["x"]), final.clone(spaces_between_special_tokens=False)):
        assert isinstance(make_detokenizer(BPE, [1, 2], [], params), IncrementalDetokenizer)
    assert isinstance(make_detokenizer(CLEANING, [1, 2], [], final), IncrementalDetokenizer)  # (no Rust decode)
