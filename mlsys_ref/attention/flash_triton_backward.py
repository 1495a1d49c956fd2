"""FlashAttention-2 backward in Triton: D = rowsum(dO ∘ O), a dK/dV kernel and a dQ kernel, no atomics.

Dao 2023, "FlashAttention-2" (arXiv 2307.08691), Algorithm 2 (backward pass) and §3.2 (work
partitioning). Algorithm 2 writes dQ with atomic adds from the key-block loop; here, as in the
FlashAttention-2 Triton kernels, dQ gets its own kernel parallel over query blocks, so every output
tile is owned by one program: deterministic and atomic-free, at the cost of computing QKᵀ twice.
Under GQA the dK/dV program of a KV head loops over every query head of its group, so the group's
gradients are summed in registers (no atomics, no [B, Hq, Sk, D] temporary).

The dK/dV loop works in transposed space, as the Triton fused-attention tutorial does: it loads Q_iᵀ and
computes S_ijᵀ = K_j Q_iᵀ, so Pᵀ and dSᵀ come out of the dots already laid out as the next dot's operand;
the dQ kernel likewise loads K_jᵀ and V_jᵀ. No register tile is ever transposed, and every dot of a loop
has the same number of rows, so on Hopper they are all asynchronous wgmma (see issue #4 in ``_dkdv_inner``).

Left out on purpose: dropout, fp8, Hopper machinery (TMA, warp specialization), and Algorithm 2's atomic
dQ (a fused dK/dV/dQ kernel with fp32 atomics measured 4-10% slower on an H100, and its dQ run-dependent).
The forward, the shared mask/bias helpers and the public functions live in
:mod:`mlsys_ref.attention.flash_triton`, the autotune configs in :mod:`mlsys_ref.attention.flash_launch`.

The one idea: P is never stored; it is recomputed from Q, K and the saved log-sum-exp
(P = exp(S - L)), and dS = P ∘ (dP - D) with D = rowsum(dO ∘ O) = rowsum(P ∘ dP) per row.
"""

from __future__ import annotations

import torch

from mlsys_ref.attention.flash_launch import _AUTOTUNE_KEY, _configs, _pruner
from mlsys_ref.attention.flash_triton import (
    _alibi_slope, _batch_and_head, _bias_and_mask, _key_range, _Problem, _sequence, _strides,
)
from mlsys_ref.backend import require_triton, tl, triton

__all__ = ["flash_backward"]


@triton.jit
def _row_stats(LSE, DELTA, rows, row_ok):
    """L_i in log2 units and D_i of query rows ``rows``; a row that saw no key (L = -inf) gets L = +inf,
    so P = exp2(S - L) = 0 there and not NaN."""
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0) * 1.4426950408889634  # log2(e)
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(DELTA + rows, mask=row_ok, other=0.0)
    return lse, delta


@triton.jit
def _preprocess_kernel(O, DO, DELTA, stride_ob, stride_oh, stride_os, stride_lb, stride_lh, num_heads,
                       CU_Q, seqlen_q, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                       VARLEN: tl.constexpr):
    """D_i = rowsum(dO_i ∘ O_i) (Algorithm 2, line 4); O and dO share one layout."""
    ACC = DELTA.dtype.element_ty
    start_m = tl.program_id(0)
    off_b, off_h = _batch_and_head(num_heads)
    q_start, seqlen_q = _sequence(CU_Q, off_b, seqlen_q, VARLEN)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM)
    offsets = off_b * stride_ob + off_h * stride_oh + (q_start + offs_m[:, None]) * stride_os + offs_d[None, :]
    o = tl.load(O + offsets, mask=mask, other=0.0).to(ACC)
    do = tl.load(DO + offsets, mask=mask, other=0.0).to(ACC)
    tl.store(DELTA + off_b * stride_lb + off_h * stride_lh + q_start + offs_m, tl.sum(o * do, 1), mask=offs_m < seqlen_q)


@triton.jit
def _load_t(X, offs_rows, offs_d, stride_s, rows, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr):
    """Xᵀ [BLOCK_D, len(offs_rows)] straight from memory (pointer arithmetic, no register transpose): the dots
    then take it as an operand as is, and ``tl.trans`` of it is only a shared-memory descriptor view."""
    mask = (offs_d[:, None] < HEAD_DIM) & (offs_rows[None, :] < rows)  # rows past the end load 0
    x_t = tl.load(X + offs_rows[None, :] * stride_s + offs_d[:, None], mask=mask, other=0.0)
    if UPCAST:  # the interpreter's bf16 tl.dot is wrong: compute in fp32 there
        x_t = x_t.to(tl.float32)
    return x_t


@triton.jit
def _bias_and_mask_t(s_t, offs_n, offs_m, seqlen_q, seqlen_k, slope, window,
                     CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr, MASKED: tl.constexpr):
    """``_bias_and_mask`` for transposed scores S_ijᵀ [BLOCK_N, BLOCK_M] (keys down, queries across)."""
    position = offs_m[None, :] + (seqlen_k - seqlen_q)  # [1, BLOCK_M]: key position of each query row
    if HAS_ALIBI:
        s_t -= slope * tl.abs(position - offs_n[:, None]).to(s_t.dtype)
    if MASKED:
        visible = (offs_n[:, None] < seqlen_k) & (offs_m[None, :] < seqlen_q)
        if CAUSAL:
            visible &= offs_n[:, None] <= position
        if HAS_WINDOW:
            visible &= offs_n[:, None] > position - window
            if not CAUSAL:
                visible &= offs_n[:, None] < position + window
        s_t = tl.where(visible, s_t, float("-inf"))
    return s_t


@triton.jit
def _dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qs, stride_os, offs_n, offs_d, lo, hi,
                seqlen_q, seqlen_k, qk_scale, slope, window,
                BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                HAS_ALIBI: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr,
                PRECISION: tl.constexpr, ACC: tl.constexpr):
    # Transposed space (keys down, queries across): S_ijᵀ = K_j Q_iᵀ comes out of the dot in exactly the layout
    # that dV += P_ijᵀ dO_i and dK += dS_ijᵀ Q_i take as their register operand: no register transpose, and all
    # four dots have BLOCK_N rows, so on Hopper they are all wgmma. Issue #4 (a triton 3.6 compiler bug, also
    # in 3.9): the old loop computed S = Q_i K_jᵀ with BLOCK_M = 32 rows, too few for wgmma, so S and dP became
    # mma.sync while dV and dK (BLOCK_N rows) were async wgmma; the pipeliner then gave the shared Q tile only
    # num_stages - 1 buffers (enough for mma.sync) yet left the dK wgmma reading it in flight (wait pendings=3)
    # while the next cp.async prefetch refilled that buffer. On an H100 at B32 H32 S512 d64 causal, dK was off
    # by 0.06-0.15 and changed run to run for 32x128 w4 s2/s3; s1 (no buffers) and 64x128 w8 (all wgmma) were
    # right; compute-sanitizer racecheck saw nothing (it does not track wgmma/cp.async). Guarded by
    # test_gpu_large_grid_causal_d64_backward_autotuned, for every config of the autotune set.
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < seqlen_q  # rows past the end load q = dO = 0, so they add nothing to dK, dV
        q_t = _load_t(Q, offs_m, offs_d, stride_qs, seqlen_q, HEAD_DIM, UPCAST)  # Q_iᵀ [BLOCK_D, BLOCK_M]
        do = tl.load(DO + offs_m[:, None] * stride_os + offs_d[None, :],
                     mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)  # dO_i [BLOCK_M, BLOCK_D]
        if UPCAST:
            do = do.to(tl.float32)
        lse, delta = _row_stats(LSE, DELTA, offs_m, row_ok)  # L_i (log2 units), D_i
        s_t = tl.dot(k, q_t, input_precision=PRECISION, out_dtype=ACC) * qk_scale  # S_ijᵀ [BLOCK_N, BLOCK_M]
        s_t = _bias_and_mask_t(s_t, offs_n, offs_m, seqlen_q, seqlen_k, slope, window,
                               CAUSAL, HAS_WINDOW, HAS_ALIBI, MASKED)
        p_t = tl.exp2(s_t - lse[None, :])  # P_ijᵀ recomputed from the saved lse (line 11)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION, out_dtype=ACC)  # dV_j += P_ijᵀ dO_i
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION, out_dtype=ACC)  # dP_ijᵀ = V_j dO_iᵀ
        ds_t = p_t * (dp_t - delta[None, :])  # dS_ijᵀ = P_ijᵀ ∘ (dP_ijᵀ - D_i)
        dk += tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), input_precision=PRECISION, out_dtype=ACC)  # dK_j += dS_ijᵀ Q_i
    return dk, dv


@triton.autotune(configs=_configs("dkdv"), key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _pruner("dkdv")})
@triton.jit
def _dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA,
                 stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
                 stride_ob, stride_oh, stride_os, stride_lb, stride_lh, num_kv_heads, qk_scale, sm_scale,
                 SLOPES, CU_Q, CU_K, stride_slope_b, seqlen_q, seqlen_k, group, window, bucket_q, bucket_k,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr, VARLEN: tl.constexpr,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    ACC = LSE.dtype.element_ty  # accumulators: fp32 (fp64 for fp64 inputs), the dtype of the saved lse
    start_n = tl.program_id(0)
    off_b, off_hk = _batch_and_head(num_kv_heads)
    q_start, seqlen_q = _sequence(CU_Q, off_b, seqlen_q, VARLEN)
    k_start, seqlen_k = _sequence(CU_K, off_b, seqlen_k, VARLEN)
    if start_n * BLOCK_N >= seqlen_k:
        return
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM)
    k_offsets = off_b * stride_kb + off_hk * stride_kh + (k_start + offs_n[:, None]) * stride_ks + offs_d[None, :]
    v_offsets = off_b * stride_vb + off_hk * stride_vh + (k_start + offs_n[:, None]) * stride_vs + offs_d[None, :]
    k = tl.load(K + k_offsets, mask=kv_mask, other=0.0)  # K_j [BLOCK_N, BLOCK_D], stays in SRAM for the whole loop
    v = tl.load(V + v_offsets, mask=kv_mask, other=0.0)  # V_j
    if UPCAST:
        k, v = k.to(tl.float32), v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    # -- query rows that see this key block: row m sits at key position m + Sk - Sq
    offset = seqlen_k - seqlen_q
    first_n = start_n * BLOCK_N
    lo = 0
    hi = seqlen_q
    if CAUSAL:
        lo = tl.maximum(first_n - offset, 0) // BLOCK_M * BLOCK_M
    if HAS_WINDOW:
        hi = tl.minimum(hi, tl.maximum(first_n + BLOCK_N - 1 - offset + window, 0))
        if not CAUSAL:
            lo = tl.maximum(first_n - offset - window + 1, 0) // BLOCK_M * BLOCK_M
        full_lo = hi  # window blocks are all masked
    elif CAUSAL:  # rows from full_lo on see the whole key block: no mask arithmetic for them
        full_lo = tl.minimum(hi, (tl.maximum(first_n + BLOCK_N - 1 - offset, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M)
    else:
        full_lo = lo
    for g in range(0, group):  # GQA: every query head of this KV head's group adds into the same dK_j, dV_j
        off_h = off_hk * group + g
        Q_h = Q + off_b * stride_qb + off_h * stride_qh + q_start * stride_qs
        DO_h = DO + off_b * stride_ob + off_h * stride_oh + q_start * stride_os
        LSE_h = LSE + off_b * stride_lb + off_h * stride_lh + q_start
        DELTA_h = DELTA + off_b * stride_lb + off_h * stride_lh + q_start
        slope = _alibi_slope(SLOPES, off_b, stride_slope_b, off_h, HAS_ALIBI)
        dk, dv = _dkdv_inner(dk, dv, k, v, Q_h, DO_h, LSE_h, DELTA_h, stride_qs, stride_os, offs_n, offs_d,
                             lo, full_lo, seqlen_q, seqlen_k, qk_scale, slope, window, BLOCK_M, HEAD_DIM,
                             CAUSAL, HAS_WINDOW, HAS_ALIBI, True, UPCAST, PRECISION, ACC)
        dk, dv = _dkdv_inner(dk, dv, k, v, Q_h, DO_h, LSE_h, DELTA_h, stride_qs, stride_os, offs_n, offs_d,
                             full_lo, hi, seqlen_q, seqlen_k, qk_scale, slope, window, BLOCK_M, HEAD_DIM,
                             CAUSAL, HAS_WINDOW, HAS_ALIBI, False, UPCAST, PRECISION, ACC)
    dk *= sm_scale  # S = scale · Q Kᵀ, so dK = scale · dSᵀ Q
    tl.store(DK + k_offsets, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + v_offsets, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, K, V, stride_ks, stride_vs, offs_m, offs_d, lo, hi,
              seqlen_q, seqlen_k, qk_scale, slope, window,
              BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
              HAS_ALIBI: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr,
              PRECISION: tl.constexpr, ACC: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_t = _load_t(K, offs_n, offs_d, stride_ks, seqlen_k, HEAD_DIM, UPCAST)  # K_jᵀ [BLOCK_D, BLOCK_N], loaded transposed
        v_t = _load_t(V, offs_n, offs_d, stride_vs, seqlen_k, HEAD_DIM, UPCAST)  # V_jᵀ
        s = tl.dot(q, k_t, input_precision=PRECISION, out_dtype=ACC) * qk_scale  # S_ij [BLOCK_M, BLOCK_N]
        s = _bias_and_mask(s, offs_m, offs_n, seqlen_q, seqlen_k, slope, window, CAUSAL, HAS_WINDOW, HAS_ALIBI, MASKED)
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, v_t, input_precision=PRECISION, out_dtype=ACC)  # dP_ij = dO_i V_jᵀ
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k_t.dtype), tl.trans(k_t), input_precision=PRECISION, out_dtype=ACC)  # dQ_i += dS_ij K_j
    return dq


@triton.autotune(configs=_configs("dq"), key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _pruner("dq")})
@triton.jit
def _dq_kernel(Q, K, V, DO, DQ, LSE, DELTA,
               stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
               stride_ob, stride_oh, stride_os, stride_lb, stride_lh, num_heads, qk_scale, sm_scale,
               SLOPES, CU_Q, CU_K, stride_slope_b, seqlen_q, seqlen_k, group, window, bucket_q, bucket_k,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr, VARLEN: tl.constexpr,
               UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    ACC = LSE.dtype.element_ty  # accumulators: fp32 (fp64 for fp64 inputs), the dtype of the saved lse
    start_m = tl.program_id(0)
    off_b, off_h = _batch_and_head(num_heads)
    off_hk = off_h // group
    q_start, seqlen_q = _sequence(CU_Q, off_b, seqlen_q, VARLEN)
    k_start, seqlen_k = _sequence(CU_K, off_b, seqlen_k, VARLEN)
    if start_m * BLOCK_M >= seqlen_q:
        return
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM)
    q_offsets = off_b * stride_qb + off_h * stride_qh + (q_start + offs_m[:, None]) * stride_qs + offs_d[None, :]
    o_offsets = off_b * stride_ob + off_h * stride_oh + (q_start + offs_m[:, None]) * stride_os + offs_d[None, :]
    q = tl.load(Q + q_offsets, mask=mask, other=0.0)
    do = tl.load(DO + o_offsets, mask=mask, other=0.0)
    if UPCAST:
        q, do = q.to(tl.float32), do.to(tl.float32)
    row = off_b * stride_lb + off_h * stride_lh + q_start + offs_m
    lse, delta = _row_stats(LSE, DELTA, row, offs_m < seqlen_q)  # L_i (log2 units), D_i
    slope = _alibi_slope(SLOPES, off_b, stride_slope_b, off_h, HAS_ALIBI)
    K += off_b * stride_kb + off_hk * stride_kh + k_start * stride_ks
    V += off_b * stride_vb + off_hk * stride_vh + k_start * stride_vs
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    full_hi, lo, hi = _key_range(start_m, seqlen_q, seqlen_k, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    dq = _dq_inner(dq, q, do, lse, delta, K, V, stride_ks, stride_vs, offs_m, offs_d, 0, full_hi,
                   seqlen_q, seqlen_k, qk_scale, slope, window, BLOCK_N, HEAD_DIM, CAUSAL, HAS_WINDOW,
                   HAS_ALIBI, False, UPCAST, PRECISION, ACC)
    dq = _dq_inner(dq, q, do, lse, delta, K, V, stride_ks, stride_vs, offs_m, offs_d, lo, hi,
                   seqlen_q, seqlen_k, qk_scale, slope, window, BLOCK_N, HEAD_DIM, CAUSAL, HAS_WINDOW,
                   HAS_ALIBI, True, UPCAST, PRECISION, ACC)
    dq *= sm_scale  # dQ = scale · dS K
    tl.store(DQ + q_offsets, dq.to(DQ.dtype.element_ty), mask=mask)


def flash_backward(q, k, v, out, lse, grad_out, grad_lse, problem: _Problem):
    """Launch preprocess, dK/dV and dQ. Returns (dq, dk, dv) shaped and strided like q, k, v."""
    require_triton("flash_attention (backward)")
    grad_out = grad_out.contiguous()  # now strided exactly like out (allocated contiguous by the forward)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)  # same strides as q, k, v ...
    if (dq.stride(), dk.stride(), dv.stride()) != (q.stride(), k.stride(), v.stride()):  # ... unless one has gaps
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    varlen, common = problem.varlen, problem.common(q)
    delta = torch.empty_like(lse)  # D: [B, Hq, Sq] (or [Hq, total_q]), the layout of lse
    lse_strides = problem.lse_strides(lse)
    block = 16 if common["BLOCK_D"] > 128 or q.device.type == "cpu" else 64
    _preprocess_kernel[(triton.cdiv(problem.seqlen_q, block), problem.batch * problem.q_heads)](
        out, grad_out, delta, *_strides(out, varlen), *lse_strides, problem.q_heads, problem.cu_q, problem.seqlen_q,
        HEAD_DIM=common["HEAD_DIM"], BLOCK_D=common["BLOCK_D"], BLOCK_M=block, VARLEN=varlen,
    )
    if grad_lse is not None:  # lse = log Σ exp(S): dS gains P · dlse, i.e. D becomes D - dlse
        delta -= grad_lse.to(delta.dtype)
    strides = (*_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(out, varlen), *lse_strides)
    scales = dict(qk_scale=problem.scale * 1.4426950408889634, sm_scale=problem.scale)
    dkdv_grid = lambda meta: (triton.cdiv(problem.seqlen_k, meta["BLOCK_N"]), problem.batch * problem.kv_heads)  # noqa: E731
    _dkdv_kernel[dkdv_grid](q, k, v, grad_out, dk, dv, lse, delta, *strides, num_kv_heads=problem.kv_heads,
                            **scales, **common)
    dq_grid = lambda meta: (triton.cdiv(problem.seqlen_q, meta["BLOCK_M"]), problem.batch * problem.q_heads)  # noqa: E731
    _dq_kernel[dq_grid](q, k, v, grad_out, dq, lse, delta, *strides, num_heads=problem.q_heads, **scales, **common)
    return dq, dk, dv


if __name__ == "__main__":
    from mlsys_ref.attention.flash_triton import flash_attention
    from mlsys_ref.attention.reference import attention_reference
    from mlsys_ref.backend import default_device
    from mlsys_ref.testing import max_error

    device = default_device()
    q, k, v = (torch.randn(2, 2, 37, 32, device=device, requires_grad=True) for _ in range(3))
    grads = torch.autograd.grad(flash_attention(q, k, v, causal=True).square().sum(), (q, k, v))
    expected = torch.autograd.grad(attention_reference(q, k, v, causal=True)[0].square().sum(), (q, k, v))
    for name, a, b in zip("qkv", grads, expected):
        print(f"flash backward (Triton, {device}) causal seq 37 d 32: max |d{name} - ref| = {max_error(a, b):.2e}")
