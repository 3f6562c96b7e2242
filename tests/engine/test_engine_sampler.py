"""Sampler against direct computations on known logits."""

import math

import pytest
import torch

from moonlet.engine.params import SamplingParams
from moonlet.engine.sampler import Sampler, apply_penalties, filter_logits
from moonlet.engine.sequence import Sequence


def seq(params, prompt=(0,), output=()):
    s = Sequence("r", list(prompt), params, frozenset())
    s.token_ids.extend(output)
    return s


def test_penalties_match_hand_computation():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
    p = SamplingParams(repetition_penalty=1.5, presence_penalty=0.3, frequency_penalty=0.2)
    out = apply_penalties(logits, [[0, 4]], [[3, 3, 2]], [p])[0].tolist()
    expect = [2.0 / 1.5, -1.0, 0.5 / 1.5 - 0.2 - 0.3, 3.0 / 1.5 - 2 * 0.2 - 0.3, -2.0 * 1.5]
    assert out == pytest.approx(expect, abs=1e-6)


def test_greedy_uses_penalized_argmax():
    logits = torch.tensor([[1.0, 0.9, 0.0]])
    tokens, _ = Sampler(seed=0)(logits, [seq(SamplingParams(temperature=0))])
    assert tokens == [0]
    tokens, _ = Sampler(seed=0)(logits, [seq(SamplingParams(temperature=0, presence_penalty=0.5), output=[0])])
    assert tokens == [1]


def test_top_k_top_p_min_p_masks():
    probs = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]])
    logits = probs.log()

    def kept(top_k=-1, top_p=1.0, min_p=0.0):
        out = filter_logits(logits, torch.tensor([top_k]), torch.tensor([top_p]), torch.tensor([min_p]))
        return torch.isfinite(out[0]).nonzero().flatten().tolist()

    assert kept() == [0, 1, 2, 3, 4]
    assert kept(top_k=2) == [0, 1]
    assert kept(top_k=1) == [0]
    assert kept(top_p=0.6) == [0, 1]  # 0.5 < 0.6, 0.5 + 0.2 reaches it
    assert kept(top_p=0.75) == [0, 1, 2]
    assert kept(top_p=0.01) == [0]  # the most likely token always stays
    assert kept(min_p=0.35) == [0, 1]  # threshold 0.175
    assert kept(min_p=0.25) == [0, 1, 2]  # threshold 0.125
    assert kept(top_k=3, top_p=0.75) == [0, 1]  # top-p over the top-3 renormalized: 0.5/0.85 + 0.2/0.85
    # rows with different settings in one batch
    both = filter_logits(logits.repeat(2, 1), torch.tensor([2, -1]), torch.tensor([1.0, 0.75]),
                         torch.tensor([0.0, 0.0]))
    assert torch.isfinite(both).sum(dim=1).tolist() == [2, 3]


@pytest.mark.parametrize("params,expect", [
    (SamplingParams(temperature=1.0), [0.5, 0.3, 0.2]),
    (SamplingParams(temperature=0.5), [0.25 / 0.38, 0.09 / 0.38, 0.04 / 0.38]),
    (SamplingParams(temperature=1.0, top_k=2), [0.5 / 0.8, 0.3 / 0.8, 0.0]),
])
def test_sampling_frequencies_follow_the_distribution(params, expect):
    rows = 4000
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log().repeat(rows, 1)
    sampler = Sampler(seed=123)
    counts = torch.zeros(3)
    for _ in range(5):
        tokens, _ = sampler(logits, [seq(params)] * rows)
        counts += torch.bincount(torch.tensor(tokens), minlength=3)
    freq = (counts / counts.sum()).tolist()
    assert freq == pytest.approx(expect, abs=0.015)


def test_seeded_request_does_not_depend_on_batch():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    logits[2] = logits[0]  # the seeded request's row: the same logits alone or last in a batch of 3
    params = SamplingParams(temperature=1.0, seed=42)

    def run(sampler, rows):
        s = seq(params)
        others = [seq(SamplingParams(temperature=1.0)) for _ in range(rows - 1)]
        picks = []
        for _ in range(6):
            tokens, _ = sampler(logits if rows == 3 else logits[:1], others + [s])
            picks.append(tokens[-1])
        return picks

    alone = run(Sampler(seed=1), 1)
    assert len(set(alone)) > 1  # it does sample
    assert run(Sampler(seed=2), 3) == alone
    assert run(Sampler(seed=9), 1) == alone


def test_logprobs_are_raw_log_softmax_top_n_plus_sampled():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0]])
    ref = torch.log_softmax(logits[0], dim=-1)
    _, lps = Sampler(seed=0)(logits, [seq(SamplingParams(temperature=0, logprobs=2))])
    assert list(lps[0]) == [0, 2]
    assert lps[0][0] == pytest.approx(float(ref[0])) and lps[0][2] == pytest.approx(float(ref[2]))
    # a sampled token outside the top-n is added
    _, lps = Sampler(seed=0)(logits, [seq(SamplingParams(temperature=0, logprobs=0, presence_penalty=2.0,
                                                         frequency_penalty=2.0),
                                           output=[0, 2])])
    assert list(lps[0]) == [1] and lps[0][1] == pytest.approx(float(ref[1]))
    assert math.isclose(sum(math.exp(v) for v in ref.tolist()), 1.0, rel_tol=1e-6)


def test_invalid_params_are_rejected_with_the_field_name():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=-1)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    assert SamplingParams(stop="x").stop == ["x"]
