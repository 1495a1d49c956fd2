"""QuantizedLinear: the storage format, forward vs the dequantized weight, act-order, state dict."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mlsys_ref.quant.linear import QuantizedLinear
from mlsys_ref.quant.primitives import quantize, unpack_int4
from mlsys_ref.testing import assert_close


@pytest.mark.parametrize("bits,group,symmetric", [(4, 32, True), (4, None, False), (8, None, True),
                                                  (8, 64, False), (3, 64, True), (3, None, False)])
def test_forward_matches_dequantized_weight(bits, group, symmetric):
    linear = nn.Linear(192, 37, bias=True)
    ql = QuantizedLinear.from_linear(linear, bits, group, symmetric)
    x = torch.randn(2, 5, 192)
    q, s, z = quantize(linear.weight.detach(), bits, symmetric=symmetric, granularity="group",
                       group_size=group or 192)
    assert torch.equal(ql.codes(), q)
    W_hat = (q.float() - (0 if z is None else z.repeat_interleave(ql.group_size, 1))) * s.repeat_interleave(ql.group_size, 1)
    assert_close(ql(x), F.linear(x, W_hat, linear.bias))
    assert ql.scales.shape == (37, 192 // ql.group_size)
    assert (ql.zeros is None) == symmetric


def test_int4_layout_is_the_documented_one():
    linear = nn.Linear(64, 6, bias=False)
    for symmetric in (True, False):
        ql = QuantizedLinear.from_linear(linear, 4, 32, symmetric)
        q = ql.codes()
        u = q + 8 if symmetric else q
        assert ql.qweight.dtype == torch.uint8 and ql.qweight.shape == (6, 32)
        assert torch.equal(ql.qweight.int(), (u[:, 0::2] & 0xF) | ((u[:, 1::2] & 0xF) << 4))
        assert torch.equal(unpack_int4(ql.qweight).int(), u)


def test_act_order_permutation():
    torch.manual_seed(1)
    K, N = 64, 10
    W = torch.randn(N, K)
    perm = torch.randperm(K)
    q, s, z = quantize(W[:, perm], 4, symmetric=True, granularity="group", group_size=16)
    ql = QuantizedLinear.from_codes(q, s, z, 4, perm=perm)
    x = torch.randn(3, K)
    stored = q.float() * s.repeat_interleave(16, 1)
    assert_close(ql(x), x[:, perm] @ stored.T)
    assert_close(ql(x), x @ ql.weight_in_input_order().T)


def test_state_dict_round_trip_exact():
    linear = nn.Linear(128, 24, bias=True)
    for bits, sym in ((4, False), (8, True), (3, True)):
        ql = QuantizedLinear.from_linear(linear, bits, 32, sym)
        fresh = QuantizedLinear.from_config(ql.config())
        fresh.load_state_dict(ql.state_dict())
        for key, value in ql.state_dict().items():
            assert torch.equal(fresh.state_dict()[key], value) and fresh.state_dict()[key].dtype == value.dtype
        x = torch.randn(4, 128)
        assert torch.equal(fresh(x), ql(x))


def test_bad_input_raises():
    with pytest.raises(ValueError, match="group_size"):
        QuantizedLinear(100, 8, bits=4, group_size=64)
    with pytest.raises(ValueError, match="even"):
        QuantizedLinear(33, 8, bits=4, group_size=None)
    with pytest.raises(ValueError, match="bits"):
        QuantizedLinear(64, 8, bits=16)
    with pytest.raises(ValueError, match="codes"):
        QuantizedLinear.from_codes(torch.full((2, 8), 9), torch.ones(2, 1), None, 4)
    with pytest.raises(ValueError, match="perm"):
        QuantizedLinear.from_codes(torch.zeros(2, 8, dtype=torch.int32), torch.ones(2, 1), None, 4,
                                   perm=torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[\.\.\., 64\]"):
        QuantizedLinear(64, 8)(torch.randn(2, 63))
