"""Primitives: round-trip error <= s/2, exact zero, exact int4 packing, fp8 error bounds, bad input."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mlsys_ref.quant.primitives import (
    FP8_DTYPES, dequantize, dequantize_fp8, expand_groups, pack_int4, qrange, quant_params, quantize,
    quantize_fp8, unpack_int4,
)

# The s/2 bound is exact in real arithmetic; fp32 division and the (q - z)·s product each add one
# rounding, so allow a few ulps of the value on top (relative to |x| + s, fp32 eps ~1.2e-7).
ULPS = 4 * torch.finfo(torch.float32).eps


def _bound_holds(x, xhat, scale):
    bound = scale / 2 + ULPS * (x.abs() + scale)
    return bool(((x - xhat).abs() <= bound).all())


@given(bits=st.sampled_from([3, 4, 8]), symmetric=st.booleans(),
       layout=st.sampled_from([("tensor", None), ("channel", None), ("group", 32), ("group", 64), ("group", 128)]),
       rows=st.integers(1, 7), seed=st.integers(0, 2**16), spread=st.floats(1e-3, 1e3))
def test_round_trip_error_at_most_half_a_step(bits, symmetric, layout, rows, seed, spread):
    granularity, group = layout
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 256, generator=g) * spread + (0 if symmetric else spread * torch.rand(1, generator=g))
    q, s, z = quantize(x, bits, symmetric=symmetric, granularity=granularity, group_size=group)
    lo, hi = qrange(bits, symmetric)
    assert q.min() >= lo and q.max() <= hi
    scale = expand_groups(s, 256) if s.shape[-1] not in (1, 256) else s.expand_as(x)
    assert _bound_holds(x, dequantize(q, s, z), scale)


@given(bits=st.sampled_from([3, 4, 8]), symmetric=st.booleans(), seed=st.integers(0, 2**16))
def test_zero_is_exact(bits, symmetric, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 64, generator=g) + 3.0  # all positive: asymmetric must still widen to hold 0
    x[:, ::5] = 0.0
    q, s, z = quantize(x, bits, symmetric=symmetric, granularity="group", group_size=32)
    assert torch.equal(dequantize(q, s, z)[:, ::5], torch.zeros(4, 13))


def test_per_token_activations():
    x = torch.randn(2, 3, 40) * torch.tensor([1.0, 100.0, 0.01]).view(1, 3, 1)
    q, s, z = quantize(x, 8, symmetric=True, granularity="token")
    assert s.shape == (2, 3, 1)
    assert _bound_holds(x, dequantize(q, s, z), s.expand_as(x))


@given(rows=st.integers(1, 9), half=st.integers(1, 33), seed=st.integers(0, 2**16))
def test_int4_pack_unpack_exact(rows, half, seed):
    u = torch.randint(0, 16, (rows, 2 * half), generator=torch.Generator().manual_seed(seed))
    packed = pack_int4(u)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, half)
    assert torch.equal(packed[:, 0], (u[:, 0] | (u[:, 1] << 4)).to(torch.uint8))  # the documented layout
    assert torch.equal(unpack_int4(packed), u.to(torch.uint8))


@pytest.mark.parametrize("dtype", FP8_DTYPES)
@pytest.mark.parametrize("granularity", ["tensor", "token"])
def test_fp8_relative_error(dtype, granularity):
    x = torch.randn(16, 96) * torch.logspace(-2, 2, 96)
    x8, s = quantize_fp8(x, dtype, granularity)
    assert x8.dtype == dtype
    mantissa = {torch.float8_e4m3fn: 3, torch.float8_e5m2: 2}[dtype]
    tiny = torch.finfo(dtype).smallest_normal * 2.0 ** -mantissa  # the subnormal step
    # normals: half an ulp relative; subnormals: half the subnormal step, times the scale
    bound = x.abs() * 2.0 ** -(mantissa + 1) + s * tiny / 2
    assert ((dequantize_fp8(x8, s) - x).abs() <= bound * (1 + 1e-6)).all()
    assert (dequantize_fp8(x8, s).abs().amax() <= x.abs().amax() * (1 + 2.0 ** -mantissa))


def test_bad_input_raises():
    with pytest.raises(ValueError, match="bits"):
        quantize(torch.randn(4, 8), 9)
    with pytest.raises(ValueError, match="group_size"):
        quantize(torch.randn(4, 96), 4, granularity="group", group_size=64)
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize(torch.tensor([[1.0, float("nan")]]), 8)
    with pytest.raises(TypeError, match="floating-point"):
        quant_params(torch.ones(2, 2, dtype=torch.int32), 8)
    with pytest.raises(ValueError, match="granularity"):
        quantize(torch.randn(4, 8), 8, granularity="row")
    with pytest.raises(ValueError, match="K even"):
        pack_int4(torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_int4(torch.full((2, 4), 16))
    with pytest.raises(ValueError, match="dtype"):
        quantize_fp8(torch.randn(2, 2), torch.float16)


def test_fractional_zero_reproduces_a_q4_1_grid():
    """llama.cpp Q4_1: w = d·q + m per 32 weights, m not a multiple of d; integer_zero=False recovers it."""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (6, 4, 32), generator=g)
    q[..., 0], q[..., 1] = 0, 15  # each block spans its whole grid, as Q4_1 blocks do
    d, m = torch.rand(6, 4, 1, generator=g) * 0.1 + 0.01, -torch.rand(6, 4, 1, generator=g)
    W = (d * q + m).reshape(6, 128)
    codes, s, z = quantize(W, 4, symmetric=False, granularity="group", group_size=32, integer_zero=False)
    assert torch.equal(codes, q.reshape(6, 128).int())
    assert (dequantize(codes, s, z) - W).abs().max() <= 4 * torch.finfo(torch.float32).eps * W.abs().max()
    integer = quantize(W, 4, symmetric=False, granularity="group", group_size=32)
    assert (dequantize(*integer) - W).abs().max() > 1e-3  # an integer zero point cannot follow m
