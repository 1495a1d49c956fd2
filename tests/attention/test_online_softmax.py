"""Online softmax (Milakov & Gimelshein 2018): the PyTorch algorithms and the Triton kernel vs torch.softmax."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mlsys_ref.attention.io_complexity import softmax_hbm
from mlsys_ref.attention.online_softmax import (
    combine,
    online_normalizer,
    softmax,
    softmax_online,
    softmax_three_pass,
)
from mlsys_ref.testing import assert_close

TORCH_ALGORITHMS = [softmax_three_pass, softmax_online]


def _expected(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """fp64 torch.softmax, with all -inf rows set to 0 (our documented convention; torch gives NaN)."""
    y = torch.softmax(x.double(), dim)
    return torch.nan_to_num(y, nan=0.0) if not torch.isnan(x).any() else y


@pytest.mark.parametrize("algorithm", TORCH_ALGORITHMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,block", [(1, 4), (37, 8), (64, 64), (65, 64), (300, 128), (300, 1000)])
def test_torch_algorithms_match_torch(algorithm, dtype, n, block):
    x = torch.randn(3, 2, n, dtype=dtype) * 5
    assert_close(algorithm(x, block=block), _expected(x).to(dtype))


def test_online_normalizer_matches_max_and_logsumexp():
    x = torch.randn(4, 129, dtype=torch.float64) * 30
    trace = []
    m, d = online_normalizer(x, block=32, trace=trace)
    assert_close(m, x.amax(-1))
    assert_close(m + d.log(), x.logsumexp(-1))
    assert [start for start, _, _ in trace] == [0, 32, 64, 96, 128]
    assert all((later[1] >= earlier[1]).all() for earlier, later in zip(trace, trace[1:]))  # m only grows


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,block_size", [(1, None), (37, None), (37, 16), (200, 64), (1023, 256)])
def test_kernel_matches_torch(device, dtype, n, block_size):
    x = (torch.randn(5, n, device=device) * 4).to(dtype)
    y = softmax(x, block_size=block_size)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, _expected(x), dtype)
    # within a small factor of torch's own error at this dtype (STYLE.md point 6)
    ours = (y.double() - _expected(x)).abs().max()
    torch_own = (torch.softmax(x, -1).double() - _expected(x)).abs().max()
    assert ours <= 2 * torch_own + 1e-6


def test_kernel_row_longer_than_default_block(device):
    x = torch.randn(2, 16384 + 37, device=device)
    assert_close(softmax(x), _expected(x), torch.float32)


@pytest.mark.parametrize("block_size", [None, 16])
def test_minus_inf(device, block_size):
    x = torch.randn(4, 40, device=device)
    x[0, 5] = float("-inf")  # one -inf: matches torch exactly (probability 0)
    x[1, :20] = float("-inf")  # the whole first block(s) -inf: m stays -inf for a while
    x[2, :] = float("-inf")  # fully -inf row: zeros by our convention (torch: NaN)
    x[3, 17:] = float("-inf")
    for y in (softmax(x, block_size=block_size), softmax_three_pass(x, 16), softmax_online(x, 16)):
        assert torch.isfinite(y).all()
        assert y[2].abs().max() == 0
        assert_close(y[[0, 1, 3]], torch.softmax(x[[0, 1, 3]].double(), -1).float())
        assert (y[0, 5] == 0) and (y[1, :20] == 0).all()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf, on purpose
def test_plus_inf_or_nan_gives_nan_row_like_torch(device):
    x = torch.randn(3, 50, device=device)
    x[0, 3] = float("inf")
    x[1, 30] = float("nan")
    for y in (softmax(x), softmax(x, block_size=16), softmax_online(x, 16)):
        assert torch.isnan(y[:2]).all() and torch.isfinite(y[2]).all()


@pytest.mark.parametrize("block_size", [None, 32])
def test_large_magnitudes_fp16(device, block_size):
    # ±1e4 in fp16: exp(1e4) overflows anything, exp(x - m) does not.
    x = torch.randn(3, 100, device=device).to(torch.float16)
    x[0, 10], x[0, 90] = 1e4, -1e4
    x[1] = torch.where(torch.rand(100, device=device) < 0.5, 1e4, -1e4).to(torch.float16)
    x[2] = (torch.randn(100, device=device) * 1e4).clamp(-6e4, 6e4).to(torch.float16)
    y = softmax(x, block_size=block_size)
    assert torch.isfinite(y).all()
    assert_close(y, _expected(x), torch.float16)
    assert_close(y.float().sum(-1), torch.ones(3), torch.float16)


@given(
    rows=st.integers(1, 4),
    n=st.integers(1, 300),
    block_size=st.sampled_from([None, 16, 32, 128]),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    scale=st.sampled_from([1.0, 100.0]),
)
def test_kernel_hypothesis(device, rows, n, block_size, dtype, scale):
    x = (torch.randn(rows, n, device=device) * scale).to(dtype)
    assert_close(softmax(x, block_size=block_size), _expected(x), dtype)


def test_other_dim_and_non_contiguous(device):
    x = torch.randn(3, 21, 5, device=device)
    assert_close(softmax(x, dim=1), torch.softmax(x, 1))
    xt = torch.randn(19, 6, device=device).t()  # [6, 19], last-dim stride 6
    assert not xt.is_contiguous()
    assert_close(softmax(xt, block_size=16), torch.softmax(xt, -1))


def test_empty(device):
    assert softmax(torch.randn(0, 7, device=device)).shape == (0, 7)
    assert softmax(torch.randn(3, 0, device=device)).shape == (3, 0)


@pytest.mark.parametrize("block_size", [None, 16])
def test_gradient_matches_torch(device, block_size):
    x = torch.randn(3, 45, device=device, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    dy = torch.randn(3, 45, device=device)
    softmax(x, block_size=block_size).backward(dy)
    torch.softmax(x_ref, -1).backward(dy)
    assert_close(x.grad, x_ref.grad)


def test_bad_input_raises(device):
    x = torch.randn(2, 8, device=device)
    with pytest.raises(TypeError, match="torch.Tensor"):
        softmax([1.0, 2.0])
    with pytest.raises(TypeError, match="dtype"):
        softmax(x.double())
    with pytest.raises(TypeError, match="dtype"):
        softmax(torch.ones(2, 8, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="at least one dimension"):
        softmax(torch.tensor(1.0, device=device))
    with pytest.raises(ValueError, match="dim"):
        softmax(x, dim=2)
    for bad in (0, 24, 8, True):
        with pytest.raises(ValueError, match="block_size"):
            softmax(x, block_size=bad)
    with pytest.raises(ValueError, match="expects tensors on"):
        softmax(torch.randn(2, 8, device="meta"))
    with pytest.raises(ValueError, match="block"):
        softmax_online(x, block=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n", [1000, 4096, 16384, 40000])
def test_kernel_gpu_large(dtype, n):
    x = (torch.randn(64, n, device="cuda") * 8).to(dtype)
    x[0, :] = float("-inf")
    x[1, : n // 2] = float("-inf")
    assert_close(softmax(x), _expected(x).to(x.device), dtype)


def test_combine_of_halves_equals_whole():
    x = torch.randn(3, 70, dtype=torch.float64) * 20
    x[1, :40] = float("-inf")  # left half's m is -inf
    m_a, d_a = online_normalizer(x[:, :40], block=16)
    m_b, d_b = online_normalizer(x[:, 40:], block=16)
    m, d = online_normalizer(x, block=16)
    for merged in (combine(m_a, d_a, m_b, d_b), combine(m_b, d_b, m_a, d_a)):
        assert_close(merged[0], m)
        assert_close(merged[1], d)


def test_softmax_hbm_counts():
    assert [softmax_hbm(100, a) for a in ("naive", "safe", "online")] == [300, 400, 300]
    assert softmax_hbm(100, "safe", on_chip=128) == 200 and softmax_hbm(200, "online", on_chip=128) == 600
    with pytest.raises(ValueError, match="algorithm"):
        softmax_hbm(10, "fast")
