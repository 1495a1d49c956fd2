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

A decoder calls this every step with the same shapes, and at batch 1 a step's K/V read takes only
microseconds, so the launcher is kept thin: the split count, tile sizes and checks of the shapes are
computed once per shape (``_plan``, cached), one split writes the output directly (no combine launch),
and a call does no host sync, so a decode step can be captured in a CUDA graph (after one warm-up call).

Semantics are attention_reference's with ``causal=True`` per sequence ``b`` over its first
``cache_seqlens[b]`` cache entries: the ``q_len`` queries are the *last* ``q_len`` tokens (bottom-right).
Left out on purpose: paged caches (block tables; see serving), appending new K/V to the cache, ALiBi,
sliding windows, fp8 KV, and a backward pass (decoding is inference only).

The one idea: partial softmax results combine exactly, using each split's lse as its log-weight.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from mlsys_ref.attention.flash_launch import _SMEM_BUDGET, _check_heads, _check_tensors
from mlsys_ref.attention.flash_triton import _batch_and_head, _load_kv, _online_softmax_step
from mlsys_ref.backend import is_interpreter, require_triton, tl, triton

__all__ = ["flash_decode"]


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


@triton.jit
def _split_kernel(Q, K, V, O_PART, LSE_PART, SEQLENS,
                  stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
                  num_kv_heads, group, q_len, cache_len, split_len, num_splits, qk_scale,
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
    # -- O_PART [B, Hq, q_len, num_splits, D] fp32 and LSE_PART [B, Hq, q_len, num_splits], contiguous. With one
    # split, O_PART *is* the output [B, Hq, q_len, D] (same offsets): no combine launch, no fp32 round trip
    part = ((off_b * num_kv_heads * group + off_h) * q_len + t) * num_splits + split  # [BLOCK_M]
    tl.store(O_PART + part[:, None] * HEAD_DIM + offs_d[None, :], (acc / l_safe[:, None]).to(O_PART.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    if num_splits > 1:  # Triton specializes an int argument equal to 1: this branch compiles away at one split
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))  # log2 units; -inf: this split saw nothing
        tl.store(LSE_PART + part, lse, mask=row_ok)


@triton.jit
def _combine_kernel(O_PART, LSE_PART, OUT, num_splits,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """One program per (batch, query head, token): O = Σ_s 2^(lse_s - lse) O_s with lse = log2 Σ_s 2^lse_s.
    The splits come in chunks of BLOCK_S, merged by the online softmax's own rescaling, so a chunk's lse and
    partial outputs are loaded together (one memory round trip when num_splits <= BLOCK_S)."""
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    m = tl.full([1], float("-inf"), dtype=tl.float32)  # running max of the lse seen so far
    total = tl.zeros([1], dtype=tl.float32)
    out = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        s_ok = s0 + offs_s < num_splits
        lse_s = tl.load(LSE_PART + row * num_splits + s0 + offs_s, mask=s_ok, other=float("-inf"))  # [BLOCK_S]
        o_s = tl.load(O_PART + (row * num_splits + s0 + offs_s[:, None]) * HEAD_DIM + offs_d[None, :],
                      mask=s_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)  # [BLOCK_S, BLOCK_D]
        m_new = tl.maximum(m, tl.max(lse_s, 0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no split has seen a key yet: weights 0, not NaN
        alpha = tl.exp2(m - m_ref)
        weight = tl.exp2(lse_s - m_ref)  # [BLOCK_S]
        total = total * alpha + tl.sum(weight, 0)
        out = out * alpha + tl.sum(weight[:, None] * o_s, 0)
        m = m_new
    out = out / tl.where(total == 0.0, 1.0, total)  # every split empty (the token sees no key): output 0
    tl.store(OUT + row * HEAD_DIM + offs_d, out.to(OUT.dtype.element_ty), mask=offs_d < HEAD_DIM)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


class _Plan(NamedTuple):
    """Everything about a call that depends only on shapes, dtype and device: computed once per shape."""
    grid: tuple
    num_splits: int
    split_len: int
    block_n: int
    num_warps: int
    num_stages: int
    block_m: int
    block_d: int
    block_s: int
    scale: float  # the default 1/sqrt(D); a caller's scale replaces it
    upcast: bool
    precision: str


MIN_SPLIT_KEYS = 64  # a split shorter than one 64-key block only adds partials for the combine to read
MAX_SPLITS = 128


def _default_splits(batch: int, kv_heads: int, cache_len: int, sm_count: int | None) -> int:
    """Key chunks per sequence: when batch × KV heads programs cannot fill the ``sm_count`` SMs, split the keys
    into one wave of programs (at most one per SM), keeping >= MIN_SPLIT_KEYS keys per split. Measured on an
    H100 at batch 1 (measured 2026-11-26): one wave of long splits beats 2-8 waves of short ones, whose extra
    partial results and shorter pipelined loops cost more than the fuller GPU gains. ``sm_count`` None (the
    interpreter): a few splits, so that the CPU tests exercise the combine."""
    if sm_count is None:
        return min(4, max(1, cache_len // 16))
    programs = batch * kv_heads
    return max(1, min(sm_count // programs, cache_len // MIN_SPLIT_KEYS, MAX_SPLITS))


def _kernel_config(num_splits: int, block_m: int, block_d: int, element_size: int) -> tuple:
    """(BLOCK_N, warps, stages) of the split kernel, measured on an H100 (bf16, d 128): one long split per
    program (a full batch) streams best with 128-key tiles over 8 warps; short splits with 64-key tiles over 4.
    BLOCK_N halves until the Q tile plus the pipelined K/V tiles fit in shared memory (d 256, fp32)."""
    block_n, warps, stages = (128, 8, 3) if num_splits == 1 else (64, 4, 3)
    while block_n > 16 and (block_m + (stages - 1) * 2 * block_n) * block_d * element_size > _SMEM_BUDGET:
        block_n //= 2
    return block_n, warps, stages


@functools.lru_cache(maxsize=512)
def _plan(q_shape: tuple, k_shape: tuple, v_shape: tuple, dtype: torch.dtype, device: torch.device,
          num_splits: int | None) -> _Plan:
    """Validate the shapes and decide splits, blocks and grid, once per shape: a decoder calls this every step
    with the same shapes, so the hot path is a dictionary lookup (invalid shapes raise, and are not cached)."""
    batch, q_heads, q_len, head_dim = q_shape
    _, kv_heads, cache_len, _ = k_shape
    if k_shape != v_shape or k_shape[0] != batch or k_shape[3] != head_dim:
        raise ValueError(f"k_cache/v_cache must both be [{batch}, Hkv, S, {head_dim}], got {k_shape} and {v_shape}")
    if not 1 <= q_len <= 16:
        raise ValueError(f"q_len must be 1..16 (decoding), got {q_len}; use flash_attention for prefill")
    _check_heads(head_dim, q_heads, kv_heads, "the cache")
    if cache_len < 1:
        raise ValueError(f"the cache must hold at least one entry, got S = {cache_len}")
    on_gpu = device.type == "cuda"
    if num_splits is None:
        num_splits = _default_splits(batch, kv_heads, cache_len, _sm_count(device.index) if on_gpu else None)
    if not isinstance(num_splits, int) or isinstance(num_splits, bool) or num_splits < 1:
        raise ValueError(f"num_splits must be a positive int, got {num_splits!r}")
    split_len = triton.cdiv(cache_len, num_splits)
    if on_gpu:
        split_len = triton.cdiv(split_len, 64) * 64  # whole key blocks per split on the GPU
    num_splits = triton.cdiv(cache_len, split_len)
    block_m = max(16, triton.next_power_of_2((q_heads // kv_heads) * q_len))  # tl.dot needs >= 16 rows
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_n, num_warps, num_stages = (16, 4, 1)  # the interpreter: small tiles, its runtime grows with their size
    if on_gpu:
        block_n, num_warps, num_stages = _kernel_config(num_splits, block_m, block_d, dtype.itemsize)
        block_n = min(block_n, split_len)
    return _Plan(grid=(num_splits, batch * kv_heads), num_splits=num_splits, split_len=split_len, block_n=block_n,
                 num_warps=num_warps, num_stages=num_stages, block_m=block_m, block_d=block_d,
                 block_s=min(32, max(2, triton.next_power_of_2(num_splits))), scale=1.0 / math.sqrt(head_dim),
                 upcast=dtype == torch.bfloat16 and is_interpreter(),
                 precision="ieee" if dtype == torch.float32 else "tf32")  # fp32 must match the reference to 1e-5


_COMPILED: dict = {}  # (kernel, device, grid, constexprs, options, specialization) -> (launcher, constexpr values)


def _specialization(args: tuple) -> tuple:
    """What Triton's JIT specializes a kernel on, per argument: a tensor's dtype and 16-byte alignment; an int's
    being 1, a multiple of 16, 32-bit; a float's being a float."""
    return tuple((a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor)
                 else (a == 1, a % 16 == 0, -2**31 <= a < 2**31) if isinstance(a, int) else float for a in args)


def _run(kernel, grid: tuple, args: tuple, constexprs: dict, options: dict) -> None:
    """``kernel[grid](*args, **constexprs, **options)``; from the second call with the same specialization on,
    through the compiled kernel's own launcher. Triton's JIT dispatch (binding the arguments, specializing them,
    hashing the cache key) costs ~20 us of host time per launch with Triton 3.6 on an H100 host, more than the
    GPU time of a batch-1 decode step (measured 2026-11-26: 30 us per JIT launch, 11 us per direct launch)."""
    if is_interpreter():
        kernel[grid](*args, **constexprs, **options)
        return
    key = (kernel, torch.cuda.current_device(),  # a compiled kernel is loaded per device, as the JIT caches it
           grid, tuple(constexprs.items()), tuple(options.items()), _specialization(args))
    cached = _COMPILED.get(key)
    if cached is None:  # the JIT compiles (or finds) the kernel and launches it; keep its launcher
        compiled = kernel[grid](*args, **constexprs, **options)
        if len(_COMPILED) > 256:  # shapes come and go (cache lengths): a bounded cache
            _COMPILED.clear()
        constexpr_values = tuple(constexprs[name] for name in kernel.arg_names[len(args):])  # in signature order
        _COMPILED[key] = (compiled[grid + (1,) * (3 - len(grid))], constexpr_values)
        return
    launcher, constexpr_values = cached
    launcher(*args, *constexpr_values)  # the compiled launcher takes every argument, constexprs included, in order


def _launch(q, k_cache, v_cache, cache_seqlens, plan: _Plan, scale: float):
    """Both launches, nothing else: no host sync and only caching-allocator memory, so it can be graph-captured."""
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    out = torch.empty((batch, q_heads, q_len, head_dim), device=q.device, dtype=q.dtype)
    if plan.num_splits == 1:
        o_part = lse_part = out  # the split kernel writes the output itself
    else:  # one allocation for the partial outputs and their lse
        parts = batch * q_heads * q_len * plan.num_splits
        scratch = torch.empty(parts * (head_dim + 1), device=q.device, dtype=torch.float32)
        o_part, lse_part = scratch, scratch[parts * head_dim:]
    _run(_split_kernel, plan.grid, (
        q, k_cache, v_cache, o_part, lse_part, cache_seqlens if cache_seqlens is not None else q,
        q.stride(0), q.stride(1), q.stride(2), *k_cache.stride()[:3], *v_cache.stride()[:3],
        kv_heads, q_heads // kv_heads, q_len, k_cache.shape[2], plan.split_len, plan.num_splits,
        scale * 1.4426950408889634),  # · log2(e) for exp2
        dict(HEAD_DIM=head_dim, BLOCK_D=plan.block_d, BLOCK_M=plan.block_m, BLOCK_N=plan.block_n,
             HAS_SEQLENS=cache_seqlens is not None, UPCAST=plan.upcast, PRECISION=plan.precision),
        dict(num_warps=plan.num_warps, num_stages=plan.num_stages))
    if plan.num_splits > 1:
        _run(_combine_kernel, (batch * q_heads * q_len,), (o_part, lse_part, out, plan.num_splits),
             dict(HEAD_DIM=head_dim, BLOCK_D=plan.block_d, BLOCK_S=plan.block_s), {})
    return out


def flash_decode(q, k_cache, v_cache, cache_seqlens=None, num_splits=None, scale=None):
    """Attention of q ``[B, Hq, q_len, D]`` (1 <= q_len <= 16) over caches ``[B, Hkv, S, D]`` -> ``[B, Hq, q_len, D]``.

    ``cache_seqlens`` (int ``[B]``, each <= S): valid cache entries per sequence (default: all S); the new
    tokens are the last ``q_len`` of them (bottom-right causal). ``num_splits``: key chunks per sequence
    (default: enough to fill the GPU). Graph-capturable once a first call has compiled the kernels.
    """
    require_triton("flash_decode")
    _check_tensors((("q", q), ("k_cache", k_cache), ("v_cache", v_cache)), 4, (torch.float16, torch.bfloat16, torch.float32))
    plan = _plan(tuple(q.shape), tuple(k_cache.shape), tuple(v_cache.shape), q.dtype, q.device, num_splits)
    if cache_seqlens is not None:
        if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.shape != (q.shape[0],) or cache_seqlens.is_floating_point():
            raise ValueError(f"cache_seqlens must be an integer tensor of shape [{q.shape[0]}]")
        if cache_seqlens.device != q.device:
            raise ValueError(f"cache_seqlens is on {cache_seqlens.device} but q is on {q.device}")
    k_cache, v_cache = (x if x.stride(-1) == 1 else x.contiguous() for x in (k_cache, v_cache))
    q = q if q.stride(-1) == 1 else q.contiguous()
    return _launch(q, k_cache, v_cache, cache_seqlens, plan, plan.scale if scale is None else float(scale))


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
