"""Paged decode and paged varlen attention against the gather-then-attend reference."""

import pytest
import torch

from mlsys_ref.serving.paged_attention import paged_attention, paged_attention_reference, paged_decode
from mlsys_ref.testing import assert_close


def make_cache(num_blocks, block_size, kv_heads, head_dim, dtype, device):
    return (torch.randn(num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device=device) for _ in range(2))


def tables(context_lens, block_size, num_blocks, device, shared_prefix_blocks=0):
    """Random, non-contiguous block tables; the first ``shared_prefix_blocks`` are the same physical
    blocks for every sequence (as after a prefix-cache hit)."""
    width = max(-(-n // block_size) for n in context_lens) + 1  # one spare column: padding is never read
    order = torch.randperm(num_blocks).tolist()
    shared, rest = order[:shared_prefix_blocks], order[shared_prefix_blocks:]
    rows = []
    for n in context_lens:
        own = -(-n // block_size) - shared_prefix_blocks
        rows.append(shared + rest[:max(own, 0)] + [0] * (width - shared_prefix_blocks - max(own, 0)))
        rest = rest[max(own, 0):]
    return torch.tensor(rows, dtype=torch.int32, device=device)


@pytest.mark.parametrize("block_size,q_heads,kv_heads,head_dim,num_splits", [
    (8, 6, 2, 32, 1),  # GQA 3
    (16, 4, 4, 24, 3),  # MHA, head dim not a power of two, 3 splits
    (8, 3, 1, 16, 2),  # MQA
])
def test_decode_matches_reference(device, block_size, q_heads, kv_heads, head_dim, num_splits):
    context_lens = [37, 1, block_size + 1, 3 * block_size]
    k_cache, v_cache = make_cache(40, block_size, kv_heads, head_dim, torch.float32, device)
    block_tables = tables(context_lens, block_size, 40, device, shared_prefix_blocks=1)
    lens = torch.tensor(context_lens, dtype=torch.int32, device=device)
    q = torch.randn(len(context_lens), q_heads, head_dim, device=device)
    cu = torch.arange(len(context_lens) + 1, dtype=torch.int32, device=device)
    expected = paged_attention_reference(q, k_cache, v_cache, block_tables, cu, lens)
    out = paged_decode(q, k_cache, v_cache, block_tables, lens, num_splits=num_splits)
    assert_close(out, expected)


@pytest.mark.parametrize("block_size", [8, 16])
def test_varlen_mixed_batch_matches_reference(device, block_size):
    # a prefill from scratch, a decode row, a later chunk of a chunked prefill, a sequence with no rows
    q_lens, context_lens = [21, 1, 9, 0], [21, 30, 40, 5]
    k_cache, v_cache = make_cache(30, block_size, 2, 32, torch.float32, device)
    block_tables = tables(context_lens, block_size, 30, device, shared_prefix_blocks=1)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    lens = torch.tensor(context_lens, dtype=torch.int32, device=device)
    q = torch.randn(sum(q_lens), 4, 32, device=device)
    expected = paged_attention_reference(q, k_cache, v_cache, block_tables, cu, lens, scale=0.3)
    assert_close(paged_attention(q, k_cache, v_cache, block_tables, cu, lens, scale=0.3), expected)
    assert_close(paged_attention(q, k_cache, v_cache, block_tables, cu, lens, scale=0.3, max_q_len=21), expected)


def test_decode_equals_varlen_with_one_row(device):
    k_cache, v_cache = make_cache(12, 8, 1, 16, torch.float32, device)
    block_tables = tables([19, 30], 8, 12, device)
    lens = torch.tensor([19, 30], dtype=torch.int32, device=device)
    q = torch.randn(2, 2, 16, device=device)
    cu = torch.arange(3, dtype=torch.int32, device=device)
    assert_close(paged_decode(q, k_cache, v_cache, block_tables, lens),
                 paged_attention(q, k_cache, v_cache, block_tables, cu, lens))


def test_decode_empty_context_gives_zero(device):
    k_cache, v_cache = make_cache(4, 8, 1, 16, torch.float32, device)
    block_tables = torch.tensor([[0], [1]], dtype=torch.int32, device=device)
    out = paged_decode(torch.randn(2, 2, 16, device=device), k_cache, v_cache, block_tables,
                       torch.tensor([0, 3], dtype=torch.int32, device=device))
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isfinite(out).all()


def test_bad_input_raises(device):
    k_cache, v_cache = make_cache(4, 8, 2, 16, torch.float32, device)
    block_tables = torch.zeros(2, 4, dtype=torch.int32, device=device)
    lens = torch.tensor([3, 5], dtype=torch.int32, device=device)
    q = torch.randn(2, 4, 16, device=device)
    with pytest.raises(ValueError, match="block_tables"):
        paged_decode(q, k_cache, v_cache, block_tables.long(), lens)
    with pytest.raises(ValueError, match="context_lens"):
        paged_decode(q, k_cache, v_cache, block_tables, lens[:1])
    with pytest.raises(ValueError, match="multiple of Hkv"):
        paged_decode(torch.randn(2, 3, 16, device=device), k_cache, v_cache, block_tables, lens)
    with pytest.raises(TypeError, match="dtype"):
        paged_decode(q.double(), k_cache, v_cache, block_tables, lens)
    with pytest.raises(ValueError, match="num_splits"):
        paged_decode(q, k_cache, v_cache, block_tables, lens, num_splits=0)
    cu = torch.tensor([0, 1, 2], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="q_len <= context_len"):
        paged_attention(q, k_cache, v_cache, block_tables, cu, torch.tensor([0, 5], dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        paged_attention(q, k_cache, v_cache, block_tables, torch.tensor([0, 1, 3], dtype=torch.int32, device=device), lens)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [8, 16, 32, 64])
def test_gpu_decode_and_prefill(block_size, dtype):
    context_lens = [1, 37, 1000, 4097, block_size + 1]
    num_blocks = sum(-(-n // block_size) for n in context_lens) + 8
    k_cache, v_cache = make_cache(num_blocks, block_size, 8, 128, dtype, "cuda")
    block_tables = tables(context_lens, block_size, num_blocks, "cuda", shared_prefix_blocks=1)
    lens = torch.tensor(context_lens, dtype=torch.int32, device="cuda")
    q = torch.randn(len(context_lens), 32, 128, dtype=dtype, device="cuda")
    cu = torch.arange(len(context_lens) + 1, dtype=torch.int32, device="cuda")
    expected = paged_attention_reference(q, k_cache, v_cache, block_tables, cu, lens)
    assert_close(paged_decode(q, k_cache, v_cache, block_tables, lens), expected, name="decode")
    assert_close(paged_decode(q, k_cache, v_cache, block_tables, lens, num_splits=7), expected, name="decode 7 splits")
    q_lens = [1, 37, 300, 129, 1]
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    q = torch.randn(sum(q_lens), 32, 128, dtype=dtype, device="cuda")
    expected = paged_attention_reference(q, k_cache, v_cache, block_tables, cu, lens)
    assert_close(paged_attention(q, k_cache, v_cache, block_tables, cu, lens), expected, name="prefill")
