"""Sampling: the rules, and a distribution that is finite and sums to 1 for every value the options admit
and every row of finite logits (one request's extreme values must never fail a step)."""

import math

import pytest
import torch

from sinkstream.sampling import GREEDY_BELOW, SamplingError, SamplingParams, penalize, probabilities, sample


def test_sampling_rules():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.5]])
    assert sample(logits, SamplingParams(), None).item() == 1
    assert sample(logits, SamplingParams(temperature=1.0, top_k=1), None).item() == 1
    assert sample(logits, SamplingParams(temperature=1.0, top_p=0.01), None).item() == 1
    g = torch.Generator().manual_seed(0)
    draws = {sample(logits, SamplingParams(temperature=1.0, top_k=2), g).item() for _ in range(200)}
    assert draws == {1, 3}  # top-k keeps exactly the two best
    g = torch.Generator().manual_seed(0)
    p = logits.softmax(-1)[0]  # top_p=0.8: 1 (p≈.53) then 3 (p≈.32) reach 0.8; 2 and 0 are cut
    draws = {sample(logits, SamplingParams(temperature=1.0, top_p=0.8), g).item() for _ in range(300)}
    assert draws == {1, 3} and p[1] < 0.8 <= p[1] + p[3]


def test_probabilities_match_the_textbook_formula():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1)) * 4
    got = probabilities(logits, SamplingParams(temperature=0.7))
    assert torch.allclose(got, (logits.double() / 0.7).softmax(-1).float(), atol=1e-6)


@pytest.mark.parametrize(
    "bad",
    [
        dict(top_p=0),
        dict(top_p=1.5),
        dict(top_p=math.nan),
        dict(temperature=-1),
        dict(temperature=math.inf),
        dict(temperature=math.nan),
        dict(max_new_tokens=-1),
        dict(top_k=-1),
        dict(seed=2**64),
        dict(seed=-(2**63) - 1),
    ],
)
def test_params_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_seed_range_is_what_torch_accepts():
    for seed in (2**64 - 1, -(2**63), 0):
        torch.Generator().manual_seed(SamplingParams(seed=seed).seed)


V = 64
LOGIT_ROWS = {
    "random": torch.randn(V, generator=torch.Generator().manual_seed(0)),
    "all tied": torch.zeros(V),
    "top tied": torch.tensor([5.0, 5.0, 5.0] + [1.0] * (V - 3)),
    "huge range": torch.tensor([3e38, -3e38] + [0.0] * (V - 2)),
    "huge and tied": torch.full((V,), 3e38),
    "tiny differences": torch.arange(V) * 1e-30,
    "-inf but one": torch.tensor([-math.inf] * (V - 1) + [2.0]),
    "+inf twice": torch.tensor([math.inf, 0.0, math.inf] + [1.0] * (V - 3)),
    "banned (-100)": torch.cat([torch.full((V - 1,), -100.0), torch.tensor([-99.0])]),
}
EXTREMES = [
    dict(temperature=t, top_p=p, top_k=k)
    for t in (0.0, 1e-300, 1e-45, GREEDY_BELOW / 2, GREEDY_BELOW, 1e-3, 1.0, 2.0, 1e30, 3e38)
    for p in (1e-300, 1e-45, 1e-8, 0.5, 1.0)
    for k in (0, 1, 3, V, 10 * V)
]


@pytest.mark.parametrize("name", LOGIT_ROWS)
def test_distribution_is_finite_and_sums_to_one(name):
    logits = torch.stack([LOGIT_ROWS[name], LOGIT_ROWS["random"]])  # rows never mix
    g = torch.Generator().manual_seed(0)
    for kw in EXTREMES:
        params = SamplingParams(**kw)
        probs = probabilities(logits, params)
        assert torch.isfinite(probs).all(), kw
        assert torch.allclose(probs.sum(-1), torch.ones(2), atol=1e-5), kw
        tid = sample(logits, params, g)
        assert probs[torch.arange(2), tid].gt(0).all(), kw  # only tokens with mass are drawn
        if name.startswith("+inf"):
            assert set(probs[0].nonzero().flatten().tolist()) <= {0, 2}


def test_tiny_temperature_and_top_p_are_greedy_like():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9]])
    for params in (SamplingParams(temperature=1e-300), SamplingParams(temperature=1.0, top_p=1e-300)):
        assert probabilities(logits, params)[0].tolist() == [0.0, 1.0, 0.0, 0.0]
    assert SamplingParams(temperature=GREEDY_BELOW / 2).greedy and not SamplingParams(temperature=GREEDY_BELOW).greedy


@pytest.mark.parametrize("row", [torch.tensor([0.0, math.nan, 1.0]), torch.full((3,), -math.inf)])
def test_undrawable_rows_raise(row):
    for params in (SamplingParams(), SamplingParams(temperature=1.0)):
        with pytest.raises(SamplingError):
            sample(row[None], params)


def _penalized_by_hand(logits, recent, answer, rep, presence, frequency):
    """The penalties as vLLM and OpenAI define them, one token at a time."""
    out = logits.clone()
    for t in set(recent):
        out[t] = out[t] / rep if out[t] > 0 else out[t] * rep
    for t in set(answer):
        out[t] -= presence + frequency * answer.count(t)
    return out


@pytest.mark.parametrize(
    "rep, presence, frequency", [(1.3, 0.0, 0.0), (0.7, 0.5, 0.0), (1.0, -1.0, 0.8), (2.0, 2.0, 2.0)]
)
def test_penalties_match_their_definition(rep, presence, frequency):
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(3)) * 3
    recent, answer = [5, 9, 9, 17, 40, 40, 40], [9, 40, 40, 2]
    params = SamplingParams(repetition_penalty=rep, presence_penalty=presence, frequency_penalty=frequency,
                            penalty_last_n=0)  # fmt: skip
    got = penalize(logits, params, recent, answer)[0]
    assert torch.allclose(got, _penalized_by_hand(logits[0], recent, answer, rep, presence, frequency), atol=1e-6)


def test_repetition_penalty_window_and_greedy():
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0]])
    assert sample(logits, SamplingParams(), None).item() == 1
    # token 1 was said in the last 2 tokens: divided by 2 it loses to token 2, greedy still
    p = SamplingParams(repetition_penalty=2.0, penalty_last_n=2)
    assert sample(penalize(logits, p, [3, 1], []), p, None).item() == 2
    assert sample(penalize(logits, p, [1, 3, 3], []), p, None).item() == 1  # out of the window


def test_min_p_keeps_tokens_near_the_likeliest():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    probs = probabilities(logits, SamplingParams(temperature=1.0, min_p=0.2))  # keeps p >= 0.1
    assert torch.allclose(probs, torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95, atol=1e-6)
    one = probabilities(logits, SamplingParams(temperature=1.0, min_p=1.0))
    assert one[0].tolist() == [1.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    "bad", [dict(min_p=1.5), dict(min_p=-0.1), dict(repetition_penalty=0), dict(repetition_penalty=1e-30),
            dict(repetition_penalty=math.nan), dict(presence_penalty=2.5), dict(frequency_penalty=-3), dict(penalty_last_n=-1)],
)  # fmt: skip
def test_penalty_params_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)
