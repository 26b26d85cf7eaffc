"""The sampler on hand-made logits (no model): greedy, seeded sampling, top-k / top-p / min-p,
penalties, min_tokens, logprobs, and the distribution it samples from; SamplingParams validation."""

from __future__ import annotations

import math

import pytest
import torch

from kiln.runtime.request import Request
from kiln.runtime.sampler import Sampler, apply_penalties, apply_top_k_top_p_min_p
from kiln.runtime.sampling_params import SamplingParams

V = 12


def _req(params: SamplingParams | None = None, prompt=(1, 2, 3), output=(), rid="r") -> Request:
    params = params or SamplingParams()
    r = Request(rid, list(prompt), params, params.max_tokens or 16)
    r.output_token_ids = list(output)
    return r


def _logits(B: int = 1, seed: int = 0, V: int = V) -> torch.Tensor:
    return torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * 2


def _from_probs(probs) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log().float()[None, :]


def _draws(sampler, logits_row, params, n, seed=0) -> list[int]:
    """n independent samples of one distribution, in one batched call (fixed global seed)."""
    torch.manual_seed(seed)
    reqs = [_req(params, rid=f"r{i}") for i in range(n)]
    return sampler(logits_row.expand(n, -1).contiguous(), reqs).token_ids


# ------------------------------------------------------------------ greedy and seeds


def test_greedy_picks_argmax_and_ignores_global_rng():
    logits = _logits(B=16, seed=1)
    reqs = [_req(SamplingParams(temperature=0.0, top_k=3, top_p=0.5), rid=str(i)) for i in range(16)]
    torch.manual_seed(0)
    a = Sampler()(logits, reqs).token_ids
    torch.manual_seed(123)
    b = Sampler()(logits, reqs).token_ids
    assert a == b == logits.argmax(-1).tolist()


def test_a_given_argmax_serves_plain_greedy_rows_and_edited_rows_recompute_it():
    """A decode CUDA graph hands over the argmax it computed with the logits: the sampler takes it
    for greedy rows, and recomputes it once penalties or min_tokens edit the logits."""
    logits = torch.tensor([[3.0, 2.9, 0.0, -1.0], [0.0, 1.0, 2.0, 0.5]])
    captured = torch.tensor([0, 2])
    plain = [_req(SamplingParams(temperature=0.0), rid=str(i)) for i in range(2)]
    # a stand-in argmax that is not the logits' shows which one the sampler returned
    assert Sampler()(logits, plain, torch.tensor([3, 3])).token_ids == [3, 3]
    assert Sampler()(logits, plain, captured).token_ids == [0, 2]
    penalised = [_req(SamplingParams(temperature=0.0, repetition_penalty=1.1), prompt=[0], rid="a"), plain[1]]
    assert Sampler()(logits, penalised, torch.tensor([0, 2])).token_ids == [1, 2]
    min_tokens = [_req(SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[0]), rid="b"), plain[1]]
    assert Sampler()(logits, min_tokens, torch.tensor([0, 2])).token_ids == [1, 2]


def test_temperature_near_zero_is_greedy():
    logits = _logits(B=32, seed=2)
    for t in (0.0, 1e-6):
        reqs = [_req(SamplingParams(temperature=t, seed=i), rid=str(i)) for i in range(32)]
        assert Sampler()(logits, reqs).token_ids == logits.argmax(-1).tolist()


def test_greedy_rows_mixed_with_sampled_rows():
    logits = torch.zeros(2, V)
    logits[:, 5] = 1.0
    greedy = _req(SamplingParams(temperature=0.0), rid="g")
    hot = _req(SamplingParams(temperature=5.0, seed=0), rid="h")
    seen = set()
    for _ in range(40):
        out = Sampler()(logits, [greedy, hot]).token_ids
        assert out[0] == 5
        seen.add(out[1])
    assert len(seen) > 3  # the hot row really samples


def _seeded_sequence(seed: int, logits: torch.Tensor, steps: int, batch_others: int = 0) -> list[int]:
    """Tokens drawn by one seeded request over `steps` calls, optionally batched with unseeded rows."""
    sampler = Sampler()
    r = _req(SamplingParams(temperature=1.0, seed=seed), rid="seeded")
    others = [_req(SamplingParams(temperature=1.0), rid=f"o{i}") for i in range(batch_others)]
    seq = []
    for step in range(steps):
        batch = others[:step % (batch_others + 1)] + [r]  # the seeded row at varying positions
        rows = torch.cat([_logits(seed=100 + j) for j in range(len(batch) - 1)] + [logits], 0)
        seq.append(sampler(rows, batch).token_ids[-1])
    return seq


def test_same_seed_same_tokens():
    logits = torch.zeros(1, V)  # uniform: as random as it gets
    torch.manual_seed(0)
    a = _seeded_sequence(7, logits, 30)
    torch.manual_seed(999)  # the global RNG does not matter to a seeded request
    b = _seeded_sequence(7, logits, 30)
    # nor does the batch around it
    c = _seeded_sequence(7, logits, 30, batch_others=3)
    assert a == b == c
    assert len(set(a)) > 3


def test_different_seeds_differ():
    logits = torch.zeros(1, V)
    seqs = [tuple(_seeded_sequence(s, logits, 30)) for s in range(5)]
    assert len(set(seqs)) == 5


def test_unseeded_requests_follow_global_rng():
    logits = torch.zeros(1, V)
    a = _draws(Sampler(), logits, SamplingParams(), 50, seed=3)
    b = _draws(Sampler(), logits, SamplingParams(), 50, seed=3)
    c = _draws(Sampler(), logits, SamplingParams(), 50, seed=4)
    assert a == b and a != c


# ------------------------------------------------------------------ filters


def test_top_k_never_samples_outside_top_k():
    logits = _logits(seed=5) * 0.3  # fairly flat, so the tail would be drawn often
    top3 = set(logits[0].topk(3).indices.tolist())
    draws = _draws(Sampler(), logits, SamplingParams(temperature=2.0, top_k=3), 3000)
    assert set(draws) == top3
    # top_k=-1 / 0: no filter
    assert len(set(_draws(Sampler(), logits, SamplingParams(temperature=2.0, top_k=-1), 3000))) == V


def test_top_k_mask_exact():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5, 2.5]])
    out = apply_top_k_top_p_min_p(logits, torch.tensor([3]), torch.tensor([1.0]), torch.tensor([0.0]))
    kept = torch.isfinite(out[0]).tolist()
    assert kept == [False, True, False, True, False, True]
    assert torch.equal(out[0, torch.isfinite(out[0])], logits[0, [1, 3, 5]])  # kept logits unchanged
    off = apply_top_k_top_p_min_p(logits, torch.tensor([0]), torch.tensor([1.0]), torch.tensor([0.0]))
    assert torch.equal(off, logits)
    big = apply_top_k_top_p_min_p(logits, torch.tensor([100]), torch.tensor([1.0]), torch.tensor([0.0]))
    assert torch.equal(big, logits)


# probabilities in a scrambled order: the mask must follow probability, not position
_P = [0.1, 0.4, 0.05, 0.3, 0.15]  # sorted: 0.4 (1), 0.3 (3), 0.15 (4), 0.1 (0), 0.05 (2)
# mass before each token, in sorted order: 0, 0.4, 0.7, 0.85, 0.95


@pytest.mark.parametrize("top_p, kept", [
    (0.3, {1}),            # 0.4 >= 0.3: only the first
    (0.65, {1, 3}),        # 0.7 >= 0.65
    (0.75, {1, 3, 4}),     # 0.85 >= 0.75
    (0.9, {1, 3, 4, 0}),   # 0.95 >= 0.9
    (0.97, {0, 1, 2, 3, 4}),
    (1.0, {0, 1, 2, 3, 4}),
])
def test_top_p_masks_tokens_whose_preceding_mass_reaches_top_p(top_p, kept):
    logits = _from_probs(_P)
    out = apply_top_k_top_p_min_p(logits, torch.tensor([0]), torch.tensor([top_p]), torch.tensor([0.0]))
    assert {i for i in range(5) if math.isfinite(out[0, i].item())} == kept
    for i in kept:
        assert out[0, i].item() == logits[0, i].item()


def test_top_p_per_row_and_tiny_top_p_keeps_the_top_token():
    logits = torch.cat([_from_probs(_P)] * 3)
    out = apply_top_k_top_p_min_p(logits, torch.tensor([0, 0, 0]), torch.tensor([1e-6, 0.65, 1.0]),
                                  torch.tensor([0.0, 0.0, 0.0]))
    assert torch.isfinite(out).sum(-1).tolist() == [1, 2, 5]
    assert math.isfinite(out[0, 1].item())


def test_top_p_applies_after_top_k():
    # top_k=2 renormalises 0.4, 0.3 to 4/7, 3/7; with top_p 0.6 both survive (mass before 3/7 = 0.571... < 0.6)
    logits = _from_probs(_P)
    out = apply_top_k_top_p_min_p(logits, torch.tensor([2]), torch.tensor([0.6]), torch.tensor([0.0]))
    assert {i for i in range(5) if math.isfinite(out[0, i].item())} == {1, 3}
    out = apply_top_k_top_p_min_p(logits, torch.tensor([2]), torch.tensor([0.55]), torch.tensor([0.0]))
    assert {i for i in range(5) if math.isfinite(out[0, i].item())} == {1}


@pytest.mark.parametrize("min_p, kept", [
    (0.2, {0, 1, 3, 4}),   # threshold 0.08: drops 0.05
    (0.3, {1, 3, 4}),      # threshold 0.12: drops 0.1, 0.05
    (0.5, {1, 3}),         # threshold 0.2
    (0.9, {1}),            # threshold 0.36
    (0.0, {0, 1, 2, 3, 4}),
])
def test_min_p_masks_tokens_below_min_p_times_pmax(min_p, kept):
    logits = _from_probs(_P)
    out = apply_top_k_top_p_min_p(logits, torch.tensor([0]), torch.tensor([1.0]), torch.tensor([min_p]))
    assert {i for i in range(5) if math.isfinite(out[0, i].item())} == kept


def test_filters_in_sampler_never_draw_filtered_tokens():
    logits = _from_probs(_P)
    assert set(_draws(Sampler(), logits, SamplingParams(top_p=0.65), 2000)) == {1, 3}
    assert set(_draws(Sampler(), logits, SamplingParams(min_p=0.3), 2000)) == {1, 3, 4}
    assert set(_draws(Sampler(), logits, SamplingParams(), 2000)) == {0, 1, 2, 3, 4}


# ------------------------------------------------------------------ distribution


def _chi_square(draws: list[int], probs: list[float]) -> float:
    n = len(draws)
    counts = torch.bincount(torch.tensor(draws), minlength=len(probs)).tolist()
    return sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probs) if p > 0) + \
        sum(c for c, p in zip(counts, probs) if p == 0) * 1e9


# chi-square critical values at p = 1e-4 (fixed seeds: these tests are deterministic anyway)
_CHI2_CRIT = {1: 15.1, 2: 18.4, 3: 21.1, 4: 23.5}


@pytest.mark.parametrize("params, expected", [
    (SamplingParams(), _P),
    (SamplingParams(temperature=0.5), [p ** 2 for p in _P]),
    (SamplingParams(temperature=2.0), [p ** 0.5 for p in _P]),
    (SamplingParams(top_k=3), [0, 0.4, 0, 0.3, 0.15]),
    (SamplingParams(top_p=0.65), [0, 0.4, 0, 0.3, 0]),
    (SamplingParams(min_p=0.3), [0, 0.4, 0, 0.3, 0.15]),
])
def test_sampling_frequencies_match_probabilities(params, expected):
    total = sum(expected)
    expected = [p / total for p in expected]
    draws = _draws(Sampler(), _from_probs(_P), params, 20000, seed=11)
    dof = sum(p > 0 for p in expected) - 1
    assert _chi_square(draws, expected) < _CHI2_CRIT[dof]
    # and a wrong distribution (the unfiltered, untempered one, when it differs) is rejected
    if [round(p, 6) for p in expected] != [round(p, 6) for p in _P]:
        assert _chi_square(draws, _P) > 100


def test_seeded_sampling_frequencies_match_probabilities():
    r = _req(SamplingParams(seed=1234))
    logits = _from_probs(_P)
    sampler = Sampler()
    draws = [sampler(logits, [r]).token_ids[0] for _ in range(4000)]
    assert _chi_square(draws, _P) < _CHI2_CRIT[4]


# ------------------------------------------------------------------ penalties


def _penalties_by_hand(logits, prompts, outputs, rep, freq, pres):
    out = logits.clone()
    for i in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            x = logits[i, t].item()
            if t in prompts[i] or t in outputs[i]:
                x = x / rep[i] if x > 0 else x * rep[i]
            count = outputs[i].count(t)
            x -= freq[i] * count
            x -= pres[i] * (1.0 if count > 0 else 0.0)
            out[i, t] = x
    return out


def test_penalties_match_definitions():
    logits = _logits(B=4, seed=9)
    prompts = [[0, 1, 1, 2], [], [5, 6], [11]]
    outputs = [[2, 2, 3], [4, 4, 4, 7], [], [11, 0, 0]]
    rep, freq, pres = [1.5, 0.7, 2.0, 1.0], [0.5, -0.3, 1.0, 0.25], [0.8, 0.0, -1.0, 1.5]
    got = apply_penalties(logits, prompts, outputs, torch.tensor(rep), torch.tensor(freq), torch.tensor(pres))
    torch.testing.assert_close(got, _penalties_by_hand(logits, prompts, outputs, rep, freq, pres))
    # neutral penalties change nothing
    same = apply_penalties(logits, prompts, outputs, torch.ones(4), torch.zeros(4), torch.zeros(4))
    torch.testing.assert_close(same, logits)


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    got = apply_penalties(logits, [[0, 1]], [[]], torch.tensor([2.0]), torch.zeros(1), torch.zeros(1))
    assert got[0].tolist() == [1.0, -4.0, 2.0, -2.0]
    # frequency and presence count output tokens only, not the prompt
    got = apply_penalties(logits, [[0, 1]], [[2, 2, 2]], torch.ones(1), torch.tensor([0.5]), torch.tensor([0.25]))
    assert got[0].tolist() == [2.0, -2.0, 2.0 - 1.5 - 0.25, -2.0]


def test_penalties_change_the_greedy_choice():
    logits = torch.tensor([[3.0, 2.9, 0.0, -1.0]])
    greedy = dict(temperature=0.0)
    assert Sampler()(logits, [_req(SamplingParams(**greedy), prompt=[3])]).token_ids == [0]
    assert Sampler()(logits, [_req(SamplingParams(presence_penalty=0.2, **greedy), prompt=[3], output=[0])]).token_ids == [1]
    assert Sampler()(logits, [_req(SamplingParams(frequency_penalty=0.05, **greedy), prompt=[3], output=[0, 0, 0])]).token_ids == [1]
    # repetition counts the prompt: 3.0 / 1.1 < 2.9
    assert Sampler()(logits, [_req(SamplingParams(repetition_penalty=1.1, **greedy), prompt=[0])]).token_ids == [1]
    # presence does not count the prompt
    assert Sampler()(logits, [_req(SamplingParams(presence_penalty=2.0, **greedy), prompt=[0])]).token_ids == [0]
    # negative logits get more negative under repetition: token 3 at -1 vs token 2 at 0, all seen
    neg = torch.tensor([[-1.0, -1.2, -5.0, -5.0]])
    assert Sampler()(neg, [_req(SamplingParams(repetition_penalty=1.5, **greedy), prompt=[0])]).token_ids == [1]


# ------------------------------------------------------------------ min_tokens


def test_min_tokens_masks_eos_and_stop_tokens():
    logits = torch.tensor([[0.0, 1.0, 5.0, 4.0, 3.0, 0.0]])  # eos=2 best, then stop token 3
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[3]).clone(_eos_token_ids=frozenset({2}))
    for n_out, expected in [(0, 4), (2, 4), (3, 2)]:
        r = _req(params, output=[1] * n_out)
        assert Sampler()(logits, [r]).token_ids == [expected], n_out
    # ignore_eos: EOS does not end the request, so nothing to mask; stop tokens still are
    r = _req(params.clone(ignore_eos=True), output=[])
    assert Sampler()(logits, [r]).token_ids == [2]
    # sampled (not greedy) rows never draw a masked token either
    hot = params.clone(temperature=1.0)
    draws = _draws(Sampler(), logits, hot, 2000)
    assert 2 not in draws and 3 not in draws and len(set(draws)) == 4


def test_min_tokens_per_row():
    logits = torch.tensor([[0.0, 5.0, 1.0]] * 2)
    params = SamplingParams(temperature=0.0, min_tokens=1).clone(_eos_token_ids=frozenset({1}))
    out = Sampler()(logits, [_req(params, output=[]), _req(params, output=[0])])
    assert out.token_ids == [2, 1]


# ------------------------------------------------------------------ logprobs


def test_logprobs_are_raw_log_softmax_with_rank_and_topk():
    logits = _logits(B=3, seed=21)
    params = [SamplingParams(logprobs=3, temperature=0.7, repetition_penalty=1.8, presence_penalty=1.0, seed=0),
              SamplingParams(logprobs=0, temperature=0.0),
              SamplingParams(temperature=1.0, top_k=4, seed=1)]  # no logprobs asked in this row
    reqs = [_req(p, prompt=[0, 1, 2], output=[3, 4], rid=str(i)) for i, p in enumerate(params)]
    out = Sampler()(logits, reqs)
    raw = logits.log_softmax(-1)
    for i, tok in enumerate(out.token_ids):
        assert out.logprobs[i] == pytest.approx(raw[i, tok].item(), abs=1e-6)
        assert out.ranks[i] == 1 + int((raw[i] > raw[i, tok]).sum())
    assert out.ranks[1] == 1 and out.token_ids[1] == logits[1].argmax().item()
    ids = raw[0].topk(3).indices.tolist()
    assert [t for t, _ in out.topk[0]] == ids
    assert [lp for _, lp in out.topk[0]] == pytest.approx(raw[0, ids].tolist(), abs=1e-6)
    assert out.topk[1] == [] and out.topk[2] == []


def test_no_logprobs_when_none_asked():
    out = Sampler()(_logits(B=2), [_req(rid="a"), _req(SamplingParams(temperature=0.0), rid="b")])
    assert out.logprobs is None and out.ranks is None and out.topk is None
    assert len(out.token_ids) == 2


def test_logprobs_ignore_min_tokens_mask():
    logits = torch.tensor([[0.0, 5.0, 1.0]])
    params = SamplingParams(temperature=0.0, min_tokens=1, logprobs=1).clone(_eos_token_ids=frozenset({1}))
    out = Sampler()(logits, [_req(params)])
    raw = logits.log_softmax(-1)
    assert out.token_ids == [2] and out.ranks == [2]
    assert out.logprobs[0] == pytest.approx(raw[0, 2].item())
    assert out.topk[0][0][0] == 1 and out.topk[0][0][1] == pytest.approx(raw[0, 1].item())


def test_sampler_does_not_modify_input_logits():
    logits = _logits(B=2, seed=4)
    before = logits.clone()
    reqs = [_req(SamplingParams(repetition_penalty=2.0, top_p=0.5, min_tokens=2).clone(_eos_token_ids=frozenset({0})),
                 output=[1], rid="a"),
            _req(SamplingParams(temperature=0.0, frequency_penalty=1.0), output=[2, 2], rid="b")]
    Sampler()(logits, reqs)
    assert torch.equal(logits, before)


# ------------------------------------------------------------------ SamplingParams validation


@pytest.mark.parametrize("kwargs, field", [
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=-0.1), "top_p"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-3), "max_tokens"),
    (dict(temperature=-0.5), "temperature"),
    (dict(n=0), "n"),
    (dict(n=-1), "n"),
    (dict(min_tokens=5, max_tokens=3), "min_tokens"),
    (dict(min_tokens=-1), "min_tokens"),
    (dict(top_k=-2), "top_k"),
    (dict(min_p=1.5), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-2.5), "frequency_penalty"),
    (dict(logprobs=-1), "logprobs"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(stop=[""]), "stop"),
])
def test_sampling_params_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field} "):
        SamplingParams(**kwargs)


def test_sampling_params_accepts_boundaries_and_normalises():
    p = SamplingParams(top_p=1.0, temperature=0.0, max_tokens=1, min_tokens=1, n=1, top_k=-1, stop="x")
    assert p.top_k == 0 and p.stop == ["x"] and p.stop_token_ids == [] and p.greedy
    assert SamplingParams(max_tokens=None, min_tokens=100).max_tokens is None
    assert not SamplingParams(temperature=0.5).greedy
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams().clone(top_p=0.0)  # clone re-validates
