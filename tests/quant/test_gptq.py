"""GPTQ: lazy-batch Cholesky version == column-by-column OBS reference; GPTQ beats RTN; RTN; bad input."""

import pytest
import torch

from mlsys_ref.quant.gptq import (
    HessianAccumulator, gptq_quantize, gptq_reference, layer_error, rtn_quantize,
)
from mlsys_ref.testing import assert_close


def _correlated(K, T, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(K, K, generator=g) / K**0.5 + torch.eye(K)
    X = (mix @ torch.randn(K, T, generator=g)) * torch.logspace(-1, 0.5, K, dtype=torch.float32)[:, None]
    return X.to(dtype)  # [K, tokens]


def _hessian(X):
    acc = HessianAccumulator(X.shape[0])
    for chunk in X.T.split(100):  # several batches: the running mean must equal 2/n XXᵀ
        acc.add(chunk)
    return acc.H


def test_hessian_is_two_x_xt_over_n():
    X = _correlated(24, 333)
    assert_close(_hessian(X), 2 * X @ X.T / 333, atol=1e-4, rtol=1e-5)  # fp32 sums of 333 products


@pytest.mark.parametrize("bits,group,symmetric,act_order,static,blocksize", [
    (4, None, False, False, False, 128),
    (4, 16, True, False, False, 24),   # groups start mid-block
    (3, 32, False, True, False, 16),   # act-order; groups span two blocks
    (4, 16, False, True, True, 40),    # static groups with act-order
    (8, 48, True, False, False, 7),    # blocksize not dividing K
    (2, None, False, True, False, 128),
])
def test_gptq_equals_column_by_column_reference(bits, group, symmetric, act_order, static, blocksize):
    N, K = 11, 96
    X = _correlated(K, 400, seed=bits, dtype=torch.float64)
    W = torch.randn(N, K, dtype=torch.float64)
    H = 2 * X @ X.T / 400
    H[5, :] = H[:, 5] = 0  # a dead input column
    kwargs = dict(bits=bits, group_size=group, symmetric=symmetric, act_order=act_order, static_groups=static)
    fast = gptq_quantize(W, H, blocksize=blocksize, **kwargs)
    slow = gptq_reference(W, H, **kwargs)
    assert torch.equal(fast.q, slow.q)
    assert_close(fast.scales, slow.scales, torch.float64)
    if not symmetric:
        assert torch.equal(fast.zeros, slow.zeros)
    assert (fast.perm is None) == (not act_order)
    if act_order:
        assert torch.equal(fast.perm, slow.perm)
        diagonal = torch.diag(H).clone()
        diagonal[5] = 1  # a dead column's H_ii is set to 1 before ordering
        assert torch.equal(fast.perm, torch.argsort(diagonal, descending=True, stable=True))
    assert_close(fast.dequantize(), slow.dequantize(), torch.float64)
    assert (fast.dequantize()[:, 5] == 0).all()  # dead column quantized to exactly zero


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("group", [None, 32, 64])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(bits, group, act_order):
    N, K = 32, 128
    X = _correlated(K, 512, seed=bits)
    W = torch.randn(N, K)
    rtn = layer_error(W, rtn_quantize(W, bits, group).dequantize(), X)
    gptq = layer_error(W, gptq_quantize(W, _hessian(X), bits, group, act_order=act_order).dequantize(), X)
    assert gptq < rtn, (gptq, rtn)


def test_result_builds_a_quantized_linear():
    W, X = torch.randn(20, 64), _correlated(64, 200)
    result = gptq_quantize(W, _hessian(X), 4, 32, symmetric=True, act_order=True)
    linear = result.to_linear(4, bias=torch.randn(20))
    x = torch.randn(3, 64)
    assert_close(linear(x), x @ result.dequantize().T.float() + linear.bias)


def test_bad_input_raises():
    W, H = torch.randn(4, 32), torch.eye(32)
    with pytest.raises(ValueError, match="group_size"):
        gptq_quantize(W, H, 4, 24)
    with pytest.raises(ValueError, match="bits"):
        gptq_quantize(W, H, 1)
    with pytest.raises(ValueError, match="H must be"):
        gptq_quantize(W, torch.eye(31))
    with pytest.raises(ValueError, match="finite"):
        gptq_quantize(W, H * float("nan"))
    with pytest.raises(ValueError, match="NaN or inf"):
        HessianAccumulator(32).add(torch.full((2, 32), float("inf")))
