"""The reference itself, against torch's math SDPA and against hand-computed cases."""

import math

import pytest
import torch
import torch.nn.functional as F

from mlsys_ref.attention.reference import attention_bias, attention_reference, attention_varlen_reference, visible_keys
from mlsys_ref.testing import assert_close


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("q_heads,kv_heads", [(4, 4), (6, 2), (3, 1)])
def test_matches_sdpa(causal, q_heads, kv_heads):
    q = torch.randn(2, q_heads, 7, 16, dtype=torch.float64)
    k = torch.randn(2, kv_heads, 7, 16, dtype=torch.float64)
    v = torch.randn(2, kv_heads, 7, 16, dtype=torch.float64)
    out, lse = attention_reference(q, k, v, causal=causal)
    group = q_heads // kv_heads
    expected = F.scaled_dot_product_attention(
        q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), is_causal=causal
    )
    assert_close(out, expected)
    scores = q @ k.repeat_interleave(group, 1).transpose(-1, -2) / math.sqrt(16)
    if causal:
        scores = scores.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf"))
    assert_close(lse, scores.logsumexp(-1))


def test_causal_is_bottom_right_aligned():
    visible = visible_keys(2, 5, causal=True)
    assert visible.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]


def test_sliding_window():
    visible = visible_keys(4, 4, causal=True, window=2)
    assert visible.tolist() == [
        [True, False, False, False],
        [True, True, False, False],
        [False, True, True, False],
        [False, False, True, True],
    ]
    both_sides = visible_keys(3, 3, causal=False, window=2)
    assert both_sides.tolist() == [[True, True, False], [True, True, True], [False, True, True]]


@pytest.mark.parametrize("causal,window", [(True, None), (False, 3), (True, 4)])
def test_tile_is_a_slice_of_the_full_mask_and_bias(causal, window):
    # flash_torch asks for one [Br, Bc] tile at a time: it must be exactly that slice of the whole.
    slopes = torch.tensor([[0.5, 0.25]])  # [batch 1, heads 2]
    full_mask = visible_keys(7, 11, causal, window)
    full_bias = attention_bias(7, 11, slopes)
    for i0, i1, j0, j1 in [(0, 3, 0, 4), (3, 7, 4, 11), (5, 6, 2, 9)]:
        tile = dict(q_start=i0, k_start=j0, q_end=i1, k_end=j1)
        assert torch.equal(visible_keys(7, 11, causal, window, **tile), full_mask[i0:i1, j0:j1])
        assert torch.equal(attention_bias(7, 11, slopes, **tile), full_bias[..., i0:i1, j0:j1])


def test_row_seeing_no_key_is_zero_not_nan():
    # 3 queries over 1 key, causal bottom-right: the first two queries see nothing.
    q, k, v = torch.randn(1, 1, 3, 8), torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    out, lse = attention_reference(q, k, v, causal=True)
    assert torch.isfinite(out).all()
    assert out[0, 0, :2].abs().max() == 0 and torch.isinf(lse[0, 0, :2]).all()
    assert_close(out[0, 0, 2], v[0, 0, 0])


def test_alibi_matches_explicit_bias():
    q, k, v = (torch.randn(1, 2, 5, 8, dtype=torch.float64) for _ in range(3))
    slopes = torch.tensor([0.5, 0.25], dtype=torch.float64)
    out, _ = attention_reference(q, k, v, causal=True, alibi_slopes=slopes)
    position = torch.arange(5)
    bias = -slopes[:, None, None] * (position[:, None] - position[None, :]).abs()
    mask = torch.ones(5, 5, dtype=torch.bool).tril()
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.masked_fill(~mask, float("-inf")))
    assert_close(out, expected[None] if expected.dim() == 3 else expected)


def test_varlen_equals_per_sequence():
    lengths = [3, 5, 1]
    cu = torch.tensor([0, 3, 8, 9])
    q, k, v = (torch.randn(9, 2, 8, dtype=torch.float64) for _ in range(3))
    out, lse = attention_varlen_reference(q, k, v, cu, cu, causal=True)
    start = 0
    for length in lengths:
        part = slice(start, start + length)
        expected, expected_lse = attention_reference(
            q[part].transpose(0, 1)[None], k[part].transpose(0, 1)[None], v[part].transpose(0, 1)[None], causal=True
        )
        assert_close(out[part], expected[0].transpose(0, 1))
        assert_close(lse[:, part], expected_lse[0])
        start += length
