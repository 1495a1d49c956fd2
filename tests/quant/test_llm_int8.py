"""LLM.int8(): the int path is exact, the decomposition matches its fp64 reference, error bounds, Int8Linear."""

import pytest
import torch
from torch import nn

from mlsys_ref.quant.llm_int8 import Int8Linear, int8_matmul, llm_int8_matmul, outlier_columns
from mlsys_ref.quant.primitives import quantize
from mlsys_ref.testing import assert_close


@pytest.mark.parametrize("use_int_mm", [True, False])
@pytest.mark.parametrize("M,K,N", [(1, 7, 3), (33, 200, 24), (17, 64, 40)])
def test_int8_matmul_is_exact(use_int_mm, M, K, N):
    a = torch.randint(-128, 128, (M, K), dtype=torch.int8)
    b = torch.randint(-128, 128, (K, N), dtype=torch.int8)
    a[0, :] = -128  # the extreme products
    b[:, 0] = -128
    out = int8_matmul(a, b, use_int_mm=use_int_mm)
    assert out.dtype == torch.int32
    assert torch.equal(out.long(), a.long() @ b.long())


def _with_outliers(T=37, K=96, columns=(5, 60)):
    x = torch.randn(T, K)
    x[:, list(columns)] *= 30
    return x


def test_decomposition_equals_its_definition():
    """Eq. 5 spelled out in fp64: outlier columns in float, the rest vector-wise int8."""
    x, linear = _with_outliers(), nn.Linear(96, 29, bias=False)
    W_i8, c_w, _ = quantize(linear.weight.detach(), 8, symmetric=True, granularity="channel")
    y = llm_int8_matmul(x, W_i8.to(torch.int8), c_w, threshold=6.0)
    O = outlier_columns(x, 6.0)
    assert set(O.tolist()) >= {5, 60}
    W_hat = W_i8.double() * c_w.double()
    rest = x.clone()
    rest[:, O] = 0
    X_i8, c_x, _ = quantize(rest, 8, symmetric=True, granularity="token")
    expected = x[:, O].double() @ W_hat[:, O].T + (X_i8.double() @ W_i8.double().T) * (c_x.double() * c_w.double().T)
    assert_close(y, expected.float())


def _error_bound(x, W, threshold):
    """|Y - XWᵀ| <= Σ_k |x| δw + |w| δx + δx δw, δ = half a step, from the int8 part only."""
    x = x.double()
    O = outlier_columns(x, threshold) if threshold else torch.tensor([], dtype=torch.long)
    rest = x.clone()
    rest[:, O] = 0
    c_x = rest.abs().amax(1, keepdim=True) / 127
    c_w = W.double().abs().amax(1, keepdim=True) / 127
    bound = rest.abs() @ (c_w / 2).expand_as(W).T + (c_x / 2) @ W.double().abs().sum(1, keepdim=True).T
    bound += (c_x / 2) @ (c_w / 2).T * x.shape[1]
    # outlier columns use the int8 weight: their error is |x_O| δw
    bound += x[:, O].abs().sum(1, keepdim=True) @ (c_w / 2).T
    return bound


@pytest.mark.parametrize("threshold", [None, 6.0])
def test_int8_linear_within_quantization_bound(threshold):
    x, linear = _with_outliers(), nn.Linear(96, 29, bias=True)
    y = Int8Linear.from_linear(linear, threshold)(x)
    exact = x.double() @ linear.weight.double().T + linear.bias.double()
    bound = _error_bound(x, linear.weight.detach(), threshold)
    assert ((y.double() - exact).abs() <= bound * (1 + 1e-5) + 1e-5).all()


def test_decomposition_helps_with_outliers():
    x, linear = _with_outliers(), nn.Linear(96, 29, bias=False)
    exact = linear(x)
    plain = (Int8Linear.from_linear(linear, None)(x) - exact).norm()
    mixed = (Int8Linear.from_linear(linear, 6.0)(x) - exact).norm()
    assert mixed < plain / 3


def test_leading_dims_and_state_dict():
    linear = nn.Linear(40, 12, bias=True)
    module = Int8Linear.from_linear(linear)
    x = torch.randn(2, 3, 40)
    assert_close(module(x), module(x.reshape(6, 40)).reshape(2, 3, 12))
    fresh = Int8Linear.from_config(module.config())
    fresh.load_state_dict(module.state_dict())
    assert torch.equal(fresh(x), module(x))


def test_bad_input_raises():
    with pytest.raises(ValueError, match="int8"):
        int8_matmul(torch.zeros(2, 3), torch.zeros(3, 2, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\[T, K"):
        llm_int8_matmul(torch.randn(2, 5), torch.zeros(3, 4, dtype=torch.int8), torch.ones(3, 1))
    with pytest.raises(ValueError, match="finite"):
        Int8Linear.from_linear(nn.Linear(4, 2))(torch.full((1, 4), float("nan")))
    with pytest.raises(ValueError, match="threshold"):
        Int8Linear(4, 2, threshold=-1.0)
