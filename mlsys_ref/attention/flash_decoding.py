"""Flash-decoding: split-KV attention for a few new query tokens over a long KV cache, in Triton.

Dao, Haziza, Massa and Sizov 2023, "Flash-Decoding for long-context inference" (PyTorch blog,
Oct 2023; the FlashAttention-2 repository's ``flash_attn_with_kvcache``). With 1..16 query tokens per
sequence, FlashAttention-2's parallelism over query blocks (arXiv 2307.08691 §3.2) gives only
batch × heads programs, too few to fill the GPU at batch 1. Flash-decoding also splits the *keys*:
step 1, each program attends its queries over one chunk of the cache and writes a partial output with
its log-sum-exp; step 2, a combine kernel merges the chunks, O = Σ_s exp(lse_s - lse) O_s.

Under GQA/MQA one program serves every query head of its KV head's group (the rows of its Q tile are
group × q_len), so each KV head is read from memory once per group, not once per query head: decoding
is bound by the bytes of KV read. The K/V tile loads and the online-softmax update are the FlashAttention
forward's own jit helpers (:mod:`mlsys_ref.attention.flash_triton`), inlined here at no cost.

Semantics are attention_reference's with ``causal=True`` per sequence ``b`` over its first
``cache_seqlens[b]`` cache entries: the ``q_len`` queries are the *last* ``q_len`` tokens (bottom-right).
Left out on purpose: paged caches (block tables; see serving), appending new K/V to the cache, ALiBi,
sliding windows, fp8 KV, and a backward pass (decoding is inference only).

The one idea: partial softmax results combine exactly, using each split's lse as its log-weight.
"""

from __future__ import annotations

import functools
import math

import torch

from mlsys_ref.attention.flash_launch import _check_heads, _check_tensors, _keep_fitting
from mlsys_ref.attention.flash_triton import _batch_and_head, _load_kv, _online_softmax_step
from mlsys_ref.backend import is_interpreter, require_triton, tl, triton

__all__ = ["flash_decode"]


def _configs() -> list:
    if is_interpreter():  # one config: autotuning under the interpreter would multiply its slow runtime
        return [triton.Config({"BLOCK_N": 16}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s) for n, w, s in
            [(64, 4, 3), (64, 4, 4), (128, 4, 2), (32, 4, 2)]]


def _prune(configs, named_args, **kwargs):
    """Keep configs whose Q tile plus pipelined K/V tiles fit in 200 KB of shared memory (at most three)."""
    rows = lambda config: (kwargs.get("BLOCK_M", 16), 2 * config.kwargs["BLOCK_N"])  # noqa: E731
    return _keep_fitting(configs, named_args, kwargs, rows, keep=3)


@triton.jit
def _split_inner(acc, m_i, l_i, q, K, V, stride_ks, stride_vs, offs_d, position, lo, hi, split_end, qk_scale,
                 BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr,
                 PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v = _load_kv(K, V, offs_n, offs_d, stride_ks, stride_vs, split_end, HEAD_DIM, UPCAST)  # [BLOCK_N, BLOCK_D]
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # log2 units: scale · log2(e) folded in
        if MASKED:  # only the split's tail block and the causal diagonal among the new tokens need a mask
            s = tl.where((offs_n[None, :] < split_end) & (offs_n[None, :] <= position[:, None]), s, float("-inf"))
        # -- the forward's online-softmax update (Algorithm 1, lines 9-10); the m = -inf guard is kept on in both
        # loops, as this kernel had it before sharing the helper (one tl.where per tile)
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, s, v, True, PRECISION, tl.float32)
    return acc, m_i, l_i


@triton.autotune(configs=_configs(), key=["BLOCK_M", "BLOCK_D", "bucket_split"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _split_kernel(Q, K, V, O_PART, LSE_PART, SEQLENS,
                  stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
                  num_kv_heads, group, q_len, cache_len, split_len, num_splits, qk_scale, bucket_split,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  HAS_SEQLENS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    split = tl.program_id(0)
    off_b, off_hk = _batch_and_head(num_kv_heads)
    seqlen = cache_len
    if HAS_SEQLENS:
        seqlen = tl.minimum(tl.load(SEQLENS + off_b).to(tl.int32), cache_len)
    # -- rows of the Q tile: (query head g of the group, new token t), so K/V are read once per group
    rows = tl.arange(0, BLOCK_M)
    g, t = rows // q_len, rows % q_len
    row_ok = rows < group * q_len
    offs_d = tl.arange(0, BLOCK_D)
    off_h = off_hk * group + g  # [BLOCK_M] query heads
    q_ptrs = Q + off_b * stride_qb + off_h[:, None] * stride_qh + t[:, None] * stride_qt + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)  # [BLOCK_M, BLOCK_D]
    if UPCAST:
        q = q.to(tl.float32)
    position = seqlen - q_len + t  # bottom-right causal: token t sees keys 0..position
    split_start = split * split_len
    split_end = tl.minimum(split_start + split_len, seqlen)
    K += off_b * stride_kb + off_hk * stride_kh
    V += off_b * stride_vb + off_hk * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # -- split the loop: blocks before every new token's position (and inside the split) need no mask
    full_end = tl.minimum(split_end, seqlen - q_len + 1)
    full_hi = split_start + tl.maximum(full_end - split_start, 0) // BLOCK_N * BLOCK_N
    acc, m_i, l_i = _split_inner(acc, m_i, l_i, q, K, V, stride_ks, stride_vs, offs_d, position, split_start,
                                 full_hi, split_end, qk_scale, BLOCK_N, HEAD_DIM, False, UPCAST, PRECISION)
    acc, m_i, l_i = _split_inner(acc, m_i, l_i, q, K, V, stride_ks, stride_vs, offs_d, position, full_hi,
                                 split_end, split_end, qk_scale, BLOCK_N, HEAD_DIM, True, UPCAST, PRECISION)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))  # log2 units; -inf: this split saw nothing
    # -- partial results: O_PART [B, Hq, q_len, num_splits, D], LSE_PART [B, Hq, q_len, num_splits], contiguous
    part = ((off_b * num_kv_heads * group + off_h) * q_len + t) * num_splits + split  # [BLOCK_M]
    tl.store(O_PART + part[:, None] * HEAD_DIM + offs_d[None, :], acc / l_safe[:, None],
             mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    tl.store(LSE_PART + part, lse, mask=row_ok)


@triton.jit
def _combine_kernel(O_PART, LSE_PART, OUT, num_splits,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """One program per (batch, query head, token): O = Σ_s 2^(lse_s - lse) O_s with lse = log2 Σ_s 2^lse_s."""
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    lse_s = tl.load(LSE_PART + row * num_splits + offs_s, mask=offs_s < num_splits, other=float("-inf"))
    m = tl.max(lse_s, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # every split empty (the token sees no key): output 0
    weight = tl.exp2(lse_s - m)  # [BLOCK_S]
    mask = (offs_s[:, None] < num_splits) & (offs_d[None, :] < HEAD_DIM)
    o_s = tl.load(O_PART + (row * num_splits + offs_s[:, None]) * HEAD_DIM + offs_d[None, :], mask=mask, other=0.0)
    total = tl.sum(weight, 0)
    out = tl.sum(weight[:, None] * o_s, 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(OUT + row * HEAD_DIM + offs_d, out.to(OUT.dtype.element_ty), mask=offs_d < HEAD_DIM)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _default_splits(batch: int, kv_heads: int, cache_len: int, device: torch.device) -> int:
    """Enough (batch, KV head, split) programs to fill the GPU about twice, each split >= 256 keys."""
    if device.type != "cuda":
        return min(4, max(1, cache_len // 16))
    programs = 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(triton.cdiv(programs, batch * kv_heads), triton.cdiv(cache_len, 256), 128))


def flash_decode(q, k_cache, v_cache, cache_seqlens=None, num_splits=None, scale=None):
    """Attention of q ``[B, Hq, q_len, D]`` (1 <= q_len <= 16) over caches ``[B, Hkv, S, D]`` -> ``[B, Hq, q_len, D]``.

    ``cache_seqlens`` (int ``[B]``, each <= S): valid cache entries per sequence (default: all S); the new
    tokens are the last ``q_len`` of them (bottom-right causal). ``num_splits``: key chunks per sequence.
    """
    require_triton("flash_decode")
    _check_tensors((("q", q), ("k_cache", k_cache), ("v_cache", v_cache)), 4, (torch.float16, torch.bfloat16, torch.float32))
    batch, q_heads, q_len, head_dim = q.shape
    _, kv_heads, cache_len, _ = k_cache.shape
    if k_cache.shape != v_cache.shape or k_cache.shape[0] != batch or k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache/v_cache must both be [{batch}, Hkv, S, {head_dim}], got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if not 1 <= q_len <= 16:
        raise ValueError(f"q_len must be 1..16 (decoding), got {q_len}; use flash_attention for prefill")
    _check_heads(head_dim, q_heads, kv_heads, "the cache")
    if cache_seqlens is not None:
        if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.shape != (batch,) or cache_seqlens.is_floating_point():
            raise ValueError(f"cache_seqlens must be an integer tensor of shape [{batch}]")
        if cache_seqlens.device != q.device:
            raise ValueError(f"cache_seqlens is on {cache_seqlens.device} but q is on {q.device}")
    if num_splits is None:
        num_splits = _default_splits(batch, kv_heads, cache_len, q.device)
    if not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits must be a positive int, got {num_splits!r}")
    group = q_heads // kv_heads
    split_len = triton.cdiv(cache_len, num_splits)
    if q.device.type == "cuda":
        split_len = triton.cdiv(split_len, 64) * 64  # whole key blocks per split on the GPU
    num_splits = triton.cdiv(cache_len, split_len)
    k_cache, v_cache = (x if x.stride(-1) == 1 else x.contiguous() for x in (k_cache, v_cache))
    q = q if q.stride(-1) == 1 else q.contiguous()
    o_part = torch.empty(batch, q_heads, q_len, num_splits, head_dim, device=q.device, dtype=torch.float32)
    lse_part = torch.empty(batch, q_heads, q_len, num_splits, device=q.device, dtype=torch.float32)
    block_d = max(16, triton.next_power_of_2(head_dim))
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    _split_kernel[(num_splits, batch * kv_heads)](
        q, k_cache, v_cache, o_part, lse_part, cache_seqlens if cache_seqlens is not None else q,
        q.stride(0), q.stride(1), q.stride(2), *k_cache.stride()[:3], *v_cache.stride()[:3],
        kv_heads, group, q_len, cache_len, split_len, num_splits, scale * 1.4426950408889634,  # · log2(e) for exp2
        triton.next_power_of_2(split_len),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=max(16, triton.next_power_of_2(group * q_len)),  # tl.dot needs >= 16 rows
        HAS_SEQLENS=cache_seqlens is not None, UPCAST=q.dtype == torch.bfloat16 and is_interpreter(),
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 must match the reference to 1e-5: no TF32
    )
    out = torch.empty(batch, q_heads, q_len, head_dim, device=q.device, dtype=q.dtype)
    _combine_kernel[(batch * q_heads * q_len,)](o_part, lse_part, out, num_splits, HEAD_DIM=head_dim,
                                                BLOCK_D=block_d, BLOCK_S=max(2, triton.next_power_of_2(num_splits)))
    return out


if __name__ == "__main__":
    from mlsys_ref.attention.reference import attention_reference
    from mlsys_ref.backend import default_device
    from mlsys_ref.testing import max_error

    device = default_device()
    q = torch.randn(2, 8, 3, 64, device=device)
    k, v = (torch.randn(2, 2, 100, 64, device=device) for _ in range(2))
    lengths = torch.tensor([100, 57], device=device)
    out = flash_decode(q, k, v, cache_seqlens=lengths, num_splits=3)
    worst = max(max_error(out[b:b + 1], attention_reference(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], causal=True)[0])
                for b, n in enumerate(lengths.tolist()))
    print(f"flash_decode (Triton, {device}) GQA 8:2, 3 new tokens, cache 100/57, 3 splits: max |O - ref| = {worst:.2e}")
