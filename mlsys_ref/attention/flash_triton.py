"""FlashAttention-2 in Triton: forward and backward; causal, sliding window, ALiBi, GQA/MQA, varlen.

Dao 2023, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning"
(arXiv 2307.08691): Algorithm 1 (forward, §3.1), Algorithm 2 (backward, §3.1) and the work
partitioning of §3.2: the forward and dQ are parallel over query blocks, dK/dV over key blocks, so
the backward needs no atomics. Tiling and recomputation come from Dao et al. 2022 (arXiv 2205.14135).

Semantics are exactly :func:`mlsys_ref.attention.reference.attention_reference`'s: SDPA layout
``[batch, heads, seq, head_dim]``; causal aligned bottom-right when ``q_len != kv_len``; a sliding
window; ALiBi slopes ``[H]`` or ``[B, H]``; ``Hq`` a multiple of ``Hkv``; a row that sees no key gives
0 (lse -inf). ``lse`` is in natural-log units. Head dims 16..256 (padded to a power of two with masks).

Left out on purpose: dropout, fp8, paged KV (see serving), and Hopper-only machinery (TMA tensor
descriptors, warp specialization): this is the teaching kernel, tuned only by a small autotune set; the
TMA forward lives in ``flash_triton_hopper.py``, the backward kernels in ``flash_triton_backward.py``, and
the autotune configs and input checks (shared with flash-decoding) in ``flash_launch.py``.

The one idea: S = QKᵀ is never written to memory. Each program holds one query tile and streams
key/value tiles past it, rescaling its running output by exp(m_old - m_new) whenever the row max grows;
the backward recomputes P from the saved log-sum-exp instead of storing it.
"""

from __future__ import annotations

import math

import torch

from mlsys_ref.attention.flash_launch import _AUTOTUNE_KEY, _check_heads, _check_tensors, _configs, _pruner
from mlsys_ref.backend import is_interpreter, require_triton, tl, triton

__all__ = ["flash_attention", "flash_attention_varlen"]


@triton.jit
def _sequence(CU, off_b, seqlen, VARLEN: tl.constexpr):
    """(first row in memory, length) of sequence ``off_b``: from cu_seqlens when packed, else (0, seqlen)."""
    start = 0
    if VARLEN:
        first = tl.load(CU + off_b)
        seqlen = tl.load(CU + off_b + 1) - first
        start = first.to(tl.int64)  # int64: start · stride can pass 2^31 in a large packed batch
    return start, seqlen


@triton.jit
def _key_range(start_m, seqlen_q, seqlen_k, window,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Key blocks for query block ``start_m``: [0, full_hi) need no mask, [lo, hi) are masked."""
    first_pos = start_m * BLOCK_M + seqlen_k - seqlen_q  # bottom-right: query row m sits at key m + Sk - Sq
    last_pos = first_pos + BLOCK_M - 1
    hi = seqlen_k
    if CAUSAL:
        hi = tl.minimum(hi, last_pos + 1)
    if HAS_WINDOW and not CAUSAL:
        hi = tl.minimum(hi, last_pos + window)
    hi = tl.maximum(hi, 0)
    if HAS_WINDOW:  # window blocks are all masked: the simple choice, they are few
        full_hi = 0
        lo = tl.maximum(first_pos - window + 1, 0) // BLOCK_N * BLOCK_N
    else:  # split the loop: blocks every row fully sees skip the mask arithmetic (most blocks, for long seqs)
        full_hi = seqlen_k // BLOCK_N * BLOCK_N
        if CAUSAL:
            full_hi = tl.minimum(full_hi, tl.maximum(first_pos + 1, 0) // BLOCK_N * BLOCK_N)
        lo = full_hi
    return full_hi, lo, hi


@triton.jit
def _bias_and_mask(s, offs_m, offs_n, seqlen_q, seqlen_k, slope, window,
                   CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr, MASKED: tl.constexpr):
    """Scores ``s`` [BLOCK_M, BLOCK_N] in log2 units, plus ALiBi, with invisible keys set to -inf."""
    position = offs_m[:, None] + (seqlen_k - seqlen_q)  # [BLOCK_M, 1]
    if HAS_ALIBI:  # slope already times log2(e), so the bias is in the same log2 units as s
        s -= slope * tl.abs(position - offs_n[None, :]).to(s.dtype)
    if MASKED:
        visible = (offs_n[None, :] < seqlen_k) & (offs_m[:, None] < seqlen_q)
        if CAUSAL:
            visible &= offs_n[None, :] <= position
        if HAS_WINDOW:
            visible &= offs_n[None, :] > position - window
            if not CAUSAL:
                visible &= offs_n[None, :] < position + window
        s = tl.where(visible, s, float("-inf"))
    return s


@triton.jit
def _batch_and_head(num_heads):
    """(batch, head) of this program from grid axis 1; int64 so that offset · stride cannot overflow."""
    return (tl.program_id(1) // num_heads).to(tl.int64), (tl.program_id(1) % num_heads).to(tl.int64)


@triton.jit
def _alibi_slope(SLOPES, off_b, stride_slope_b, off_h, HAS_ALIBI: tl.constexpr):
    """ALiBi slope of head ``off_h`` times log2(e), so the bias is in the log2 units of the scores; 0 without ALiBi."""
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(SLOPES + off_b * stride_slope_b + off_h) * 1.4426950408889634  # log2(e)
    return slope


@triton.jit
def _load_kv(K, V, offs_n, offs_d, stride_ks, stride_vs, seqlen_k, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr):
    """K_j, V_j [BLOCK_N, BLOCK_D]: rows from ``seqlen_k`` on and the head-dim padding load as 0."""
    kv_mask = (offs_n[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + offs_n[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + offs_n[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
    if UPCAST:  # the interpreter's bf16 tl.dot is wrong: compute in fp32 there
        k, v = k.to(tl.float32), v.to(tl.float32)
    return k, v


@triton.jit
def _online_softmax_step(acc, m_i, l_i, s, v, MASKED: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr):
    """Fold one tile of scores ``s`` (log2 units) and its V_j into (acc, m_i, l_i) (Algorithm 1, lines 9-10)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_ref = m_new
    if MASKED:  # a row that has seen no key keeps m = -inf: subtract 0 instead, so exp2 gives 0 and not NaN
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_ref[:, None])  # P̃_ij [BLOCK_M, BLOCK_N]
    alpha = tl.exp2(m_i - m_ref)  # rescales what was accumulated under the old max
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION, out_dtype=ACC)
    return acc, m_new, l_i


@triton.jit
def _fwd_inner(acc, m_i, l_i, q, K, V, stride_ks, stride_vs, offs_m, offs_d, lo, hi,
               seqlen_q, seqlen_k, qk_scale, slope, window,
               BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
               HAS_ALIBI: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr,
               PRECISION: tl.constexpr, ACC: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v = _load_kv(K, V, offs_n, offs_d, stride_ks, stride_vs, seqlen_k, HEAD_DIM, UPCAST)  # K_j, V_j [BLOCK_N, BLOCK_D]
        # -- S_ij = Q_i K_jᵀ · scale · log2(e): exp2 is the native instruction and exp(x) = exp2(x·log2 e)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC) * qk_scale
        s = _bias_and_mask(s, offs_m, offs_n, seqlen_q, seqlen_k, slope, window, CAUSAL, HAS_WINDOW, HAS_ALIBI, MASKED)
        # -- update m_i, l_i and rescale acc (Algorithm 1, lines 9-10)
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, s, v, MASKED, PRECISION, ACC)
    return acc, m_i, l_i


@triton.autotune(configs=_configs("fwd"), key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _pruner("fwd")})
@triton.jit
def _fwd_kernel(Q, K, V, O, LSE,
                stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
                stride_ob, stride_oh, stride_os, stride_lb, stride_lh, num_heads, qk_scale,
                SLOPES, CU_Q, CU_K, stride_slope_b, seqlen_q, seqlen_k, group, window, bucket_q, bucket_k,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr, VARLEN: tl.constexpr,
                UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    ACC = LSE.dtype.element_ty  # accumulators: fp32 (fp64 for fp64 inputs), the dtype of the saved lse
    start_m = tl.program_id(0)
    off_b, off_h = _batch_and_head(num_heads)
    off_hk = off_h // group  # GQA: query head h reads KV head h // (Hq / Hkv)
    q_start, seqlen_q = _sequence(CU_Q, off_b, seqlen_q, VARLEN)
    k_start, seqlen_k = _sequence(CU_K, off_b, seqlen_k, VARLEN)
    if start_m * BLOCK_M >= seqlen_q:
        return
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    Q += off_b * stride_qb + off_h * stride_qh + q_start * stride_qs
    K += off_b * stride_kb + off_hk * stride_kh + k_start * stride_ks
    V += off_b * stride_vb + off_hk * stride_vh + k_start * stride_vs
    q_mask = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + offs_m[:, None] * stride_qs + offs_d[None, :], mask=q_mask, other=0.0)  # Q_i [BLOCK_M, BLOCK_D]
    if UPCAST:
        q = q.to(tl.float32)
    slope = _alibi_slope(SLOPES, off_b, stride_slope_b, off_h, HAS_ALIBI)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    full_hi, lo, hi = _key_range(start_m, seqlen_q, seqlen_k, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K, V, stride_ks, stride_vs, offs_m, offs_d, 0, full_hi,
                               seqlen_q, seqlen_k, qk_scale, slope, window, BLOCK_N, HEAD_DIM, CAUSAL,
                               HAS_WINDOW, HAS_ALIBI, False, UPCAST, PRECISION, ACC)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K, V, stride_ks, stride_vs, offs_m, offs_d, lo, hi,
                               seqlen_q, seqlen_k, qk_scale, slope, window, BLOCK_N, HEAD_DIM, CAUSAL,
                               HAS_WINDOW, HAS_ALIBI, True, UPCAST, PRECISION, ACC)
    # -- O_i = diag(l_i)^-1 acc, L_i = m_i + log l_i (Algorithm 1, lines 12-13); l_i = 0 <=> the row saw no key
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453  # ln 2: back from log2 to natural-log units
    lse = tl.where(l_i == 0.0, float("-inf"), lse)
    O += off_b * stride_ob + off_h * stride_oh + q_start * stride_os
    tl.store(O + offs_m[:, None] * stride_os + offs_d[None, :], out.to(O.dtype.element_ty), mask=q_mask)
    tl.store(LSE + off_b * stride_lb + off_h * stride_lh + q_start + offs_m, lse, mask=offs_m < seqlen_q)


# ---------------------------------------------------------------- validating launcher

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check(q, k, v, rank: int, alibi_slopes, window, scale, batch: int | None) -> None:
    _check_tensors((("q", q), ("k", k), ("v", v)), rank, _DTYPES)
    head_dim, q_heads, kv_heads = q.shape[-1], q.shape[1], k.shape[1]
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[-1] != head_dim:
        raise ValueError(f"k's head_dim {k.shape[-1]} differs from q's {head_dim}")
    _check_heads(head_dim, q_heads, kv_heads, "k/v")
    if rank == 4 and k.shape[0] != q.shape[0]:
        raise ValueError(f"q has batch {q.shape[0]} but k/v have batch {k.shape[0]}")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be a positive int or None, got {window!r}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, torch.Tensor) or alibi_slopes.device != q.device:
            raise ValueError(f"alibi_slopes must be a tensor on {q.device}")
        if tuple(alibi_slopes.shape) not in ((q_heads,), (batch, q_heads)):
            raise ValueError(f"alibi_slopes must have shape [{q_heads}] or [{batch}, {q_heads}], got {tuple(alibi_slopes.shape)}")


def _strides(x: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, head, seq) strides; packed [total, H, D] tensors have no batch stride (rows come from cu_seqlens)."""
    return (0, x.stride(1), x.stride(0)) if varlen else (x.stride(0), x.stride(1), x.stride(2))


def _options(q: torch.Tensor) -> dict:
    return dict(
        HEAD_DIM=q.shape[-1],
        BLOCK_D=max(16, triton.next_power_of_2(q.shape[-1])),  # pad 80 -> 128 etc.; loads mask the padding
        UPCAST=q.dtype == torch.bfloat16 and is_interpreter(),
        PRECISION="ieee" if q.dtype in (torch.float32, torch.float64) else "tf32",  # fp32 must match to 1e-5: no TF32
    )


class _Problem:
    """Everything both passes need: shapes, sequence layout (batched or packed), masks and scale."""

    def __init__(self, q, k, causal, scale, window, alibi_slopes, cu_q=None, cu_k=None, max_q=None, max_k=None):
        self.varlen = cu_q is not None
        self.batch = cu_q.numel() - 1 if self.varlen else q.shape[0]
        self.q_heads, self.kv_heads = q.shape[1], k.shape[1]
        self.seqlen_q = max_q if self.varlen else q.shape[2]
        self.seqlen_k = max_k if self.varlen else k.shape[2]
        self.cu_q, self.cu_k = (cu_q, cu_k) if self.varlen else (q, q)  # unused pointers when not packed
        self.causal, self.window = causal, window
        self.scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        self.slopes = alibi_slopes.to(acc).contiguous() if alibi_slopes is not None else None

    def lse_empty(self, q):  # [B, Hq, Sq], or [Hq, total_q] when packed (as the reference returns)
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        shape = (self.q_heads, q.shape[0]) if self.varlen else (self.batch, self.q_heads, self.seqlen_q)
        return torch.empty(shape, device=q.device, dtype=acc)

    def lse_strides(self, lse):
        return (0, lse.stride(0)) if self.varlen else (lse.stride(0), lse.stride(1))

    def common(self, q):
        """Scalar arguments and constexprs shared by the forward and backward kernels."""
        slopes = self.slopes if self.slopes is not None else q
        return dict(
            SLOPES=slopes, CU_Q=self.cu_q, CU_K=self.cu_k,
            stride_slope_b=slopes.stride(0) if self.slopes is not None and slopes.dim() == 2 else 0,
            seqlen_q=self.seqlen_q, seqlen_k=self.seqlen_k, group=self.q_heads // self.kv_heads,
            window=self.window or 0, bucket_q=triton.next_power_of_2(self.seqlen_q),
            bucket_k=triton.next_power_of_2(self.seqlen_k),  # autotune key: power-of-two buckets, no retune per length
            CAUSAL=self.causal, HAS_WINDOW=self.window is not None, HAS_ALIBI=self.slopes is not None,
            VARLEN=self.varlen, **_options(q),
        )


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def flash_forward(q, k, v, problem: _Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel: returns (O like q, lse)."""
    require_triton("flash_attention")
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    lse = problem.lse_empty(q)
    varlen = problem.varlen
    grid = lambda meta: (triton.cdiv(problem.seqlen_q, meta["BLOCK_M"]), problem.batch * problem.q_heads)  # noqa: E731
    _fwd_kernel[grid](
        q, k, v, out, lse, *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen),
        *_strides(out, varlen), *problem.lse_strides(lse),
        num_heads=problem.q_heads, qk_scale=problem.scale * 1.4426950408889634,  # scale · log2(e), for exp2
        **problem.common(q),
    )
    return out, lse


# ---------------------------------------------------------------- autograd and public functions


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, problem):
        q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
        out, lse = flash_forward(q, k, v, problem)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.problem = problem
        ctx.set_materialize_grads(False)  # an unused lse brings grad None, not a tensor of zeros to subtract
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        from mlsys_ref.attention.flash_triton_backward import flash_backward  # avoids an import cycle

        q, k, v, out, lse = ctx.saved_tensors
        grad_out = torch.zeros_like(out) if grad_out is None else grad_out
        dq, dk, dv = flash_backward(q, k, v, out, lse, grad_out, grad_lse, ctx.problem)
        return dq, dk, dv, None


def flash_attention(q, k, v, causal=False, scale=None, window=None, alibi_slopes=None, return_lse=False):
    """softmax(Q Kᵀ · scale + ALiBi + mask) V with Triton kernels, forward and backward.

    q ``[B, Hq, Sq, D]``, k/v ``[B, Hkv, Sk, D]`` (fp16, bf16, fp32; fp64 for gradcheck) -> O ``[B, Hq, Sq, D]``
    (and lse ``[B, Hq, Sq]`` in fp32, natural log, if ``return_lse``). Same semantics as attention_reference.
    """
    _check(q, k, v, 4, alibi_slopes, window, scale, q.shape[0] if isinstance(q, torch.Tensor) else None)
    problem = _Problem(q, k, bool(causal), scale, window, alibi_slopes)
    out, lse = _FlashAttention.apply(q, k, v, problem)
    return (out, lse) if return_lse else out


def flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False,
                           scale=None, window=None, alibi_slopes=None, return_lse=False):
    """Packed variable-length batch: q ``[total_q, Hq, D]``, k/v ``[total_k, Hkv, D]``, sequence ``i`` in rows
    ``cu_seqlens[i]:cu_seqlens[i+1]`` (int32, ``[num_seqs + 1]``). Returns O ``[total_q, Hq, D]`` (and lse ``[Hq, total_q]``)."""
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be a 1-D int32/int64 tensor of cumulative lengths [num_seqs + 1]")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel() or cu_seqlens_q.numel() < 2:
        raise ValueError("cu_seqlens_q and cu_seqlens_k must have the same length num_seqs + 1 >= 2")
    _check(q, k, v, 3, alibi_slopes, window, scale, cu_seqlens_q.numel() - 1)
    for name, cu, total in (("cu_seqlens_q", cu_seqlens_q, q.shape[0]), ("cu_seqlens_k", cu_seqlens_k, k.shape[0])):
        if cu.device != q.device:
            raise ValueError(f"{name} is on {cu.device} but q is on {q.device}")
        if int(cu[-1]) != total:
            raise ValueError(f"{name}[-1] = {int(cu[-1])} must equal the number of packed rows {total}")
    lengths_q, lengths_k = cu_seqlens_q.diff(), cu_seqlens_k.diff()
    if int(lengths_q.max()) > max_seqlen_q or int(lengths_k.max()) > max_seqlen_k:
        raise ValueError("max_seqlen_q/max_seqlen_k must be at least the longest sequence in cu_seqlens")
    problem = _Problem(q, k, bool(causal), scale, window, alibi_slopes, cu_seqlens_q.to(torch.int32),
                       cu_seqlens_k.to(torch.int32), int(max_seqlen_q), int(max_seqlen_k))
    out, lse = _FlashAttention.apply(q, k, v, problem)
    return (out, lse) if return_lse else out


if __name__ == "__main__":
    from mlsys_ref.attention.reference import attention_reference
    from mlsys_ref.backend import default_device
    from mlsys_ref.testing import max_error

    device = default_device()
    q = torch.randn(1, 4, 37, 64, device=device, requires_grad=True)
    k, v = (torch.randn(1, 2, 45, 64, device=device, requires_grad=True) for _ in range(2))
    out = flash_attention(q, k, v, causal=True)
    expected, _ = attention_reference(q, k, v, causal=True)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    expected_grads = torch.autograd.grad(expected.sum(), (q, k, v))
    print(f"flash_attention (Triton, {device}) causal GQA 4:2, seq 37x45, d 64: max |O - ref| = {max_error(out, expected):.2e}")
    for name, a, b in zip("qkv", grads, expected_grads):
        print(f"  max |d{name} - ref| = {max_error(a, b):.2e}")
