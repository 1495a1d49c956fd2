"""SmoothQuant: smoothing is an identity (bit-exact with power-of-two factors), Eq. 4, W8A8 helps."""

import pytest
import torch
from torch import nn

from mlsys_ref.quant.llm_int8 import Int8Linear
from mlsys_ref.quant.smoothquant import (
    collect_input_absmax, fold_smoothing, llama_smooth_pairs, smooth_model, smoothing_factors,
)
from mlsys_ref.serving.model import Llama, LlamaConfig
from mlsys_ref.testing import assert_close


def _smoothed_llama(power_of_two):
    model = Llama.random(LlamaConfig.tiny(num_layers=3))
    tokens = torch.randint(0, 97, (2, 19))
    before = model.forward_dense(tokens)
    pairs = llama_smooth_pairs(model)
    assert len(pairs) == 3 * 3
    stats = collect_input_absmax(model, [c[0] for _, c in pairs], lambda m: m.forward_dense(tokens))
    smooth_model(model, pairs, stats, alpha=0.5, power_of_two=power_of_two)
    return model.forward_dense(tokens), before, model


def test_smoothing_alone_is_an_identity_in_fp32():
    after, before, _ = _smoothed_llama(power_of_two=False)
    assert_close(after, before)


def test_smoothing_with_power_of_two_factors_is_bit_exact():
    after, before, _ = _smoothed_llama(power_of_two=True)
    assert torch.equal(after, before)


def test_factors_follow_eq4():
    act = torch.tensor([1.0, 100.0, 0.0, 4.0])
    W1, W2 = torch.tensor([[1.0, 2.0, 0.5, -4.0]]), torch.tensor([[-3.0, 1.0, 0.25, 1.0]])
    s = smoothing_factors(act, [W1, W2], alpha=0.5)
    expected = torch.tensor([1 / 3**0.5, 10 / 2**0.5, 1e-5**0.5 / 0.5**0.5, 2 / 2.0])
    assert_close(s, expected)
    assert_close(smoothing_factors(act, [W1], alpha=1.0), act.clamp(min=1e-5))


def test_fold_into_linear_producer_and_w8a8_gains():
    torch.manual_seed(3)
    up, down = nn.Linear(32, 64), nn.Linear(64, 16)
    x = torch.randn(50, 32)
    with torch.no_grad():
        up.weight[:5] *= 40  # outlier channels in down's input
    reference = down(up(x))
    w8a8 = Int8Linear.from_linear(down, None)(up(x))
    stats = up(x).abs().amax(0).detach()
    fold_smoothing(up, [down], smoothing_factors(stats, [down.weight], 0.5))
    assert_close(down(up(x)), reference, atol=1e-4, rtol=1e-5)  # fp32, K=64 products summed twice
    smoothed = Int8Linear.from_linear(down, None)(up(x))
    assert (smoothed - reference).norm() < (w8a8 - reference).norm()


def test_bad_input_raises():
    with pytest.raises(ValueError, match="alpha"):
        smoothing_factors(torch.ones(3), [torch.ones(2, 3)], alpha=1.5)
    with pytest.raises(ValueError, match="K="):
        smoothing_factors(torch.ones(3), [torch.ones(2, 4)])
    with pytest.raises(TypeError, match="producer"):
        fold_smoothing(nn.ReLU(), [nn.Linear(3, 2)], torch.ones(3))
    with pytest.raises(ValueError, match="NaN or inf"):
        collect_input_absmax(nn.Sequential(nn.Linear(3, 2)), ["0"], lambda m: m(torch.full((1, 3), float("nan"))))
