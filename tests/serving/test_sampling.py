"""Sampling: parameter validation, greedy, top-k/top-p filtering, seeds independent of the batch."""

import pytest
import torch

from mlsys_ref.serving.sampling import SamplingParams, _filter_top_k_top_p, make_generator, sample


@pytest.mark.parametrize("kwargs", [
    dict(temperature=-0.1), dict(temperature=float("nan")), dict(top_k=-1), dict(top_k=2.5),
    dict(top_p=0.0), dict(top_p=1.5), dict(seed=-3), dict(seed=1.0), dict(max_tokens=0),
    dict(max_tokens=True), dict(stop_token_ids=[-1]), dict(stop_token_ids=["a"]),
])
def test_invalid_params_raise(kwargs):
    with pytest.raises((ValueError, TypeError)):
        SamplingParams(**kwargs)


def test_params_defaults_are_greedy_and_stops_become_a_tuple():
    params = SamplingParams(stop_token_ids=[3, 5])
    assert params.greedy and params.stop_token_ids == (3, 5)
    assert not SamplingParams(temperature=0.7).greedy
    assert make_generator(SamplingParams(), "cpu") is None


def test_greedy_rows_are_argmax():
    logits = torch.randn(5, 33)
    tokens = sample(logits, [SamplingParams()] * 5, [None] * 5)
    assert tokens == logits.argmax(-1).tolist()


def test_filter_keeps_top_k_and_the_nucleus():
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.1, 0.3, 0.05], [0.05, 0.5, 0.1, 0.3, 0.05]]))
    out = _filter_top_k_top_p(logits, torch.tensor([2, 0]), torch.tensor([1.0, 0.85]))
    kept = torch.isfinite(out)
    assert kept[0].tolist() == [False, True, False, True, False]  # top-2
    assert kept[1].tolist() == [False, True, True, True, False]  # 0.5 + 0.3 < 0.85, so 0.1 joins
    assert torch.equal(out[kept], logits[kept])


def test_sampled_frequencies_follow_softmax_within_top_k():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 0.2]])
    params = SamplingParams(temperature=1.0, top_k=3, seed=7)
    generator = make_generator(params, "cpu")
    draws = torch.tensor([sample(logits, [params], [generator])[0] for _ in range(3000)])
    expected = torch.zeros(7)
    expected[[0, 1, 2]] = torch.softmax(logits[0, [0, 1, 2]], dim=0)
    observed = torch.bincount(draws, minlength=7).float() / len(draws)
    assert (observed - expected).abs().max() < 0.04  # ~4 standard errors at n=3000


def test_seeded_rows_do_not_depend_on_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(6, 41)
    params = [SamplingParams(temperature=0.9, top_p=0.9, seed=11), SamplingParams(), SamplingParams(temperature=1.3, top_k=7, seed=5),
              SamplingParams(temperature=0.5, seed=None), SamplingParams(temperature=2.0, seed=3), SamplingParams(temperature=1.0, seed=11)]
    alone = [[sample(logits[i:i + 1], [params[i]], [g])[0] for _ in range(4)]
             for i, g in ((0, make_generator(params[0], "cpu")), (2, make_generator(params[2], "cpu")))]
    generators = [make_generator(p, "cpu") for p in params]
    together = [sample(logits, params, generators) for _ in range(4)]
    assert [row[0] for row in together] == alone[0]
    assert [row[2] for row in together] == alone[1]
    # reversed batch order, fresh generators: the same draws again
    generators = [make_generator(p, "cpu") for p in params[::-1]]
    reversed_rows = [sample(logits.flip(0), params[::-1], generators) for _ in range(4)]
    assert [row[5] for row in reversed_rows] == alone[0]


def test_sample_validates_shapes():
    with pytest.raises(ValueError):
        sample(torch.randn(3), [SamplingParams()], [None])
    with pytest.raises(ValueError):
        sample(torch.randn(2, 5), [SamplingParams()], [None])
    with pytest.raises(ValueError):
        sample(torch.randn(1, 5), [SamplingParams(temperature=1.0)], [None])
