"""Flash-decoding (split-KV + combine) against the reference, per sequence over its valid cache entries."""

import pytest
import torch

from mlsys_ref.attention.flash_decoding import (MAX_SPLITS, MIN_SPLIT_KEYS, _SMEM_BUDGET, _default_splits, _kernel_config,
                                                 _plan, flash_decode)
from mlsys_ref.attention.reference import attention_reference
from mlsys_ref.testing import assert_close


def _expected(q, k_cache, v_cache, lengths, scale=None):
    """The reference, one sequence at a time over its first ``lengths[b]`` cache entries (bottom-right causal)."""
    outs = [attention_reference(q[b:b + 1].float(), k_cache[b:b + 1, :, :n].float(), v_cache[b:b + 1, :, :n].float(),
                                causal=True, scale=scale)[0] for b, n in enumerate(lengths)]
    return torch.cat(outs)


CASES = [  # batch, Hq, Hkv, q_len, cache_len, lengths (None: all), num_splits, head_dim
    (2, 4, 4, 1, 37, None, None, 32),  # MHA, one token, default splits
    (3, 8, 2, 1, 45, [45, 20, 1], 3, 32),  # GQA 4:1, cache_seqlens < S, a sequence of one token
    (2, 4, 1, 16, 37, [37, 10], 2, 32),  # MQA, 16 new tokens (more than some caches hold: rows see nothing)
    (1, 6, 2, 5, 50, [33], 7, 80),  # head_dim 80, more splits than needed (empty splits)
]


@pytest.mark.parametrize("batch,q_heads,kv_heads,q_len,cache_len,lengths,num_splits,head_dim", CASES)
def test_matches_reference(batch, q_heads, kv_heads, q_len, cache_len, lengths, num_splits, head_dim, device):
    q = torch.randn(batch, q_heads, q_len, head_dim, device=device)
    k_cache, v_cache = (torch.randn(batch, kv_heads, cache_len, head_dim, device=device) for _ in range(2))
    seqlens = torch.tensor(lengths, device=device, dtype=torch.int32) if lengths else None
    out = flash_decode(q, k_cache, v_cache, cache_seqlens=seqlens, num_splits=num_splits)
    assert_close(out, _expected(q, k_cache, v_cache, lengths or [cache_len] * batch))


@pytest.mark.parametrize("num_splits", [1, 2, 5])
def test_splits_do_not_change_the_result_fp16(num_splits, device):
    q = torch.randn(2, 4, 3, 64, device=device, dtype=torch.float16)
    k_cache, v_cache = (torch.randn(2, 2, 41, 64, device=device, dtype=torch.float16) for _ in range(2))
    seqlens = torch.tensor([41, 18], device=device)
    out = flash_decode(q, k_cache, v_cache, cache_seqlens=seqlens, num_splits=num_splits, scale=0.2)
    assert_close(out, _expected(q, k_cache, v_cache, [41, 18], scale=0.2).half())


@pytest.mark.parametrize("case", range(7))
def test_bad_inputs_raise(case, device):
    q = torch.randn(1, 4, 1, 32, device=device)
    cache = torch.randn(1, 2, 16, 32, device=device)
    calls = [
        (ValueError, lambda: flash_decode(q[0], cache, cache)),  # wrong rank
        (TypeError, lambda: flash_decode(q, cache.half(), cache)),  # mismatched dtypes
        (ValueError, lambda: flash_decode(q, torch.randn(1, 3, 16, 32, device=device), torch.randn(1, 3, 16, 32, device=device))),
        (ValueError, lambda: flash_decode(torch.randn(1, 4, 17, 32, device=device), cache, cache)),  # q_len > 16
        (ValueError, lambda: flash_decode(q, cache, cache, cache_seqlens=torch.ones(2, dtype=torch.int32, device=device))),
        (ValueError, lambda: flash_decode(q, cache, cache, num_splits=0)),
        (ValueError, lambda: flash_decode(torch.randn(1, 4, 1, 8, device=device), cache[..., :8], cache[..., :8])),
    ]
    error, call = calls[case]
    with pytest.raises(error):
        call()


@pytest.mark.gpu
@pytest.mark.parametrize("batch,cache_len,q_len", [(8, 4096, 1), (4, 4096, 4), (1, 32768, 1)])
def test_gpu_bf16_long_cache(batch, cache_len, q_len, device):
    q = torch.randn(batch, 32, q_len, 128, device=device, dtype=torch.bfloat16)
    k_cache, v_cache = (torch.randn(batch, 8, cache_len, 128, device=device, dtype=torch.bfloat16) for _ in range(2))
    lengths = torch.randint(cache_len // 2, cache_len + 1, (batch,)).tolist()
    lengths[0] = cache_len
    seqlens = torch.tensor(lengths, device=device, dtype=torch.int32)
    out = flash_decode(q, k_cache, v_cache, cache_seqlens=seqlens)
    assert_close(out, _expected(q, k_cache, v_cache, lengths).to(torch.bfloat16), torch.bfloat16)


def test_many_splits_combine_in_chunks(device):
    """More splits than the combine kernel's chunk (BLOCK_S <= 32): its loop over chunks must see them all."""
    q = torch.randn(1, 4, 2, 32, device=device)
    k_cache, v_cache = (torch.randn(1, 2, 45, 32, device=device) for _ in range(2))
    out = flash_decode(q, k_cache, v_cache, num_splits=45)  # one key per split on the CPU
    assert_close(out, _expected(q, k_cache, v_cache, [45]))


@pytest.mark.parametrize("batch,kv_heads,cache_len", [(1, 8, 4096), (1, 8, 32768), (2, 8, 16384), (4, 1, 100),
                                                      (16, 8, 8192), (64, 8, 4096), (1, 8, 64)])
def test_default_splits_fill_the_gpu_and_keep_splits_long(batch, kv_heads, cache_len):
    sms = 132
    splits = _default_splits(batch, kv_heads, cache_len, sms)
    assert 1 <= splits <= MAX_SPLITS
    if batch * kv_heads >= sms:  # the batch alone fills the GPU: no combine pass
        assert splits == 1
    else:  # one wave: every program has an SM, and one more split per sequence would not fit ...
        assert batch * kv_heads * splits <= sms
        # ... unless the splits would get shorter than MIN_SPLIT_KEYS
        assert batch * kv_heads * (splits + 1) > sms or splits in (MAX_SPLITS, max(1, cache_len // MIN_SPLIT_KEYS))
        assert -(-cache_len // splits) >= MIN_SPLIT_KEYS or cache_len < MIN_SPLIT_KEYS
    assert _default_splits(2 * batch, kv_heads, cache_len, sms) <= splits  # more sequences, fewer splits


def test_plan_is_computed_once_per_shape_and_bad_shapes_always_raise(device):
    q = torch.randn(1, 4, 1, 32, device=device)
    cache = torch.randn(1, 2, 16, 32, device=device)
    before = _plan.cache_info().hits
    flash_decode(q, cache, cache)
    flash_decode(q, cache, cache)
    assert _plan.cache_info().hits >= before + 1
    for _ in range(2):  # exceptions are not cached: the second bad call raises too
        with pytest.raises(ValueError):
            flash_decode(q, cache, cache[:, :, :8])


@pytest.mark.gpu
@pytest.mark.parametrize("batch,cache_len", [(1, 4096), (64, 1024)])
def test_gpu_graph_capture_replays_new_inputs(batch, cache_len, device):
    """A decode step under a CUDA graph: after a warm-up call, capture once, then replay with new q and cache."""
    q = torch.randn(batch, 32, 1, 128, device=device, dtype=torch.bfloat16)
    k_cache, v_cache = (torch.randn(batch, 8, cache_len, 128, device=device, dtype=torch.bfloat16) for _ in range(2))
    seqlens = torch.full((batch,), cache_len, device=device, dtype=torch.int32)
    flash_decode(q, k_cache, v_cache, cache_seqlens=seqlens)  # compiles the kernels outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = flash_decode(q, k_cache, v_cache, cache_seqlens=seqlens)
    for _ in range(2):
        q.copy_(torch.randn_like(q))
        k_cache.copy_(torch.randn_like(k_cache))
        seqlens.fill_(cache_len - 7)
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, flash_decode(q, k_cache, v_cache, cache_seqlens=seqlens), torch.bfloat16)


@pytest.mark.parametrize("num_splits,block_m,head_dim,dtype", [(1, 16, 128, torch.bfloat16), (16, 16, 128, torch.bfloat16),
                                                               (1, 16, 256, torch.float32), (8, 256, 256, torch.float32)])
def test_kernel_config_fits_shared_memory(num_splits, block_m, head_dim, dtype):
    block_n, _, stages = _kernel_config(num_splits, block_m, head_dim, dtype.itemsize)
    assert block_n >= 16 and (block_m + (stages - 1) * 2 * block_n) * head_dim * dtype.itemsize <= _SMEM_BUDGET or block_n == 16


@pytest.mark.gpu
def test_gpu_direct_launch_matches_reference_on_new_data_and_alignments(device):
    """From the second call on, the kernels launch through the compiled launcher: it must see new data, new
    lengths, and a cache whose storage is not 16-byte aligned (another specialization, compiled afresh)."""
    from mlsys_ref.attention import flash_decoding

    for step in range(4):
        q = torch.randn(2, 32, 1, 128, device=device, dtype=torch.bfloat16)
        flat = torch.randn(2 * 2 * 8 * 1000 * 128 + 1, device=device, dtype=torch.bfloat16)
        start = 1 if step == 3 else 0  # the last step: K/V start 2 bytes past an aligned address
        size = 2 * 8 * 1000 * 128
        k_cache, v_cache = flat[start:start + size].view(2, 8, 1000, 128), flat[-size:].view(2, 8, 1000, 128)
        lengths = [1000 - 97 * step, 1 + 300 * step]
        out = flash_decode(q, k_cache, v_cache, cache_seqlens=torch.tensor(lengths, device=device, dtype=torch.int32))
        assert_close(out, _expected(q, k_cache, v_cache, lengths).to(torch.bfloat16), torch.bfloat16)
    assert len(flash_decoding._COMPILED) >= 2  # split and combine launchers kept
