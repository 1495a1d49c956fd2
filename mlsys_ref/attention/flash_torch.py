"""Tiled FlashAttention in plain PyTorch: FlashAttention-2's forward and backward, loops and all.

Dao 2023, "FlashAttention-2", arXiv 2307.08691:
- Algorithm 1 (forward): Q is cut into Tr blocks of Br rows, K and V into Tc blocks of Bc rows. For
  each Q block the running max ``m_i``, running sum ``l_i`` and unnormalized output ``acc`` are
  rescaled by ``exp(m_old - m_new)`` as each K/V block arrives (the online softmax of Milakov &
  Gimelshein 2018); O is divided by ``l`` once at the end and ``L = m + log l`` is saved.
- Algorithm 2 (backward): ``D = rowsum(dO ∘ O)``; K/V blocks outer, Q blocks inner; P is recomputed
  from the saved L, then dV += Pᵀ dO, dP = dO Vᵀ, dS = P ∘ (dP - D), dQ += dS K, dK += dSᵀ Q.
- §3.1.1: blocks whose every entry is masked (above the causal diagonal, outside the window) are skipped.

Same semantics as `reference.attention_reference`: causal aligned bottom-right when q_len != kv_len,
sliding window, ALiBi slopes ``[Hq]`` or ``[B, Hq]``, GQA/MQA (Hq a multiple of Hkv), and a row that
sees no key gives O = 0 and L = -inf, never NaN. The lse is differentiable too: its gradient enters
as ``dS = P ∘ (dP - D + dL)``. Arithmetic in fp32 (fp64 for fp64 inputs), O cast back to q's dtype.

Left out (on purpose): everything about speed. Each "block" is a slice of a tensor in memory, not
SRAM; all batches and heads are processed at once by broadcasting; GQA repeats K and V per query
head instead of sharing them; ALiBi slopes get no gradient; no dropout, no varlen (see the Triton
kernels for those). ``trace`` records m and l after each block and the HBM traffic the algorithm
would make (for the notebook and `io_complexity`).

The one idea to notice: ``acc`` and ``l`` are both scaled by the same ``exp(m_old - m_new)``, so
O = acc / l never needs the full row of scores; the backward needs only L to rebuild P.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from mlsys_ref.attention.reference import attention_bias, visible_keys

__all__ = ["FlashTrace", "flash_forward", "flash_backward", "flash_attention_torch"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class FlashTrace:
    """What the tiled forward did. ``steps``: ``(i, j, m_i, l_i)`` after K/V block j of Q block i
    (``[B, Hq, Br]`` each). ``hbm_reads``/``hbm_writes``: elements loaded/stored, all batches and heads."""

    steps: list = field(default_factory=list)
    skipped: list = field(default_factory=list)  # (i, j) blocks skipped: fully masked
    hbm_reads: int = 0
    hbm_writes: int = 0


def _tile_scores(q_i, k_j, i0, j0, q_len, kv_len, scale, causal, window, alibi_slopes):
    """S_ij = scale · Q_i K_jᵀ (+ ALiBi), masked to -inf; ``None`` when the whole tile is masked.

    The tile's mask and bias come from the reference's own `visible_keys` and `attention_bias`
    (query row r sits at key position r + kv_len - q_len), so the two cannot drift apart.
    """
    tile = dict(q_start=i0, k_start=j0, q_end=i0 + q_i.shape[-2], k_end=j0 + k_j.shape[-2])
    visible = visible_keys(q_len, kv_len, causal, window, device=q_i.device, **tile)  # [Br, Bc]
    if not visible.any():
        return None
    S_ij = torch.matmul(q_i, k_j.transpose(-1, -2)) * scale  # [B, Hq, Br, Bc]
    if alibi_slopes is not None:
        S_ij = S_ij + attention_bias(q_len, kv_len, alibi_slopes, **tile)  # slopes already in S_ij's dtype
    return S_ij.masked_fill(~visible, float("-inf"))


def _prepare(q, k, v, scale, alibi_slopes):
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = q.shape[1] // k.shape[1]
    k_full = k.to(compute).repeat_interleave(group, dim=1)  # [B, Hq, Sk, D]: query head h reads KV head h // group
    v_full = v.to(compute).repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    slopes = None if alibi_slopes is None else alibi_slopes.to(compute)
    return compute, group, k_full, v_full, scale, slopes


def flash_forward(q, k, v, causal=False, scale=None, window=None, alibi_slopes=None, Br=32, Bc=32, trace=None):
    """FlashAttention-2 Algorithm 1. q ``[B, Hq, Sq, D]``, k/v ``[B, Hkv, Sk, D]`` -> (O ``[B, Hq, Sq, D]``, L ``[B, Hq, Sq]``)."""
    _validate(q, k, v, scale, window, alibi_slopes, Br, Bc)
    if trace is not None and not isinstance(trace, FlashTrace):
        raise TypeError(f"trace must be a FlashTrace or None, got {type(trace).__name__}")
    compute, _, k_full, v_full, scale, slopes = _prepare(q, k, v, scale, alibi_slopes)
    batch, heads, q_len, head_dim = q.shape
    kv_len = k.shape[2]
    O = torch.empty(batch, heads, q_len, head_dim, dtype=q.dtype, device=q.device)  # in HBM
    L = torch.empty(batch, heads, q_len, dtype=compute, device=q.device)
    per_row = batch * heads  # trace counts elements over all (batch, head) pairs
    for i, i0 in enumerate(range(0, q_len, Br)):  # Tr = ⌈Sq / Br⌉ blocks
        Q_i = q[:, :, i0 : i0 + Br].to(compute)  # load Q_i: [B, Hq, Br, D]
        rows = Q_i.shape[2]
        m_i = torch.full((batch, heads, rows), float("-inf"), dtype=compute, device=q.device)  # running max
        l_i = torch.zeros(batch, heads, rows, dtype=compute, device=q.device)  # running sum of exp
        acc = torch.zeros(batch, heads, rows, head_dim, dtype=compute, device=q.device)  # Õ_i, unnormalized
        if trace is not None:
            trace.hbm_reads += per_row * rows * head_dim
        for j, j0 in enumerate(range(0, kv_len, Bc)):  # Tc = ⌈Sk / Bc⌉ blocks
            K_j, V_j = k_full[:, :, j0 : j0 + Bc], v_full[:, :, j0 : j0 + Bc]  # load K_j, V_j: [B, Hq, Bc, D]
            S_ij = _tile_scores(Q_i, K_j, i0, j0, q_len, kv_len, scale, causal, window, slopes)
            if S_ij is None:  # fully masked tile: K_j, V_j never loaded
                if trace is not None:
                    trace.skipped.append((i, j))
                continue
            # -- update m_i and l_i; rescale the accumulator by alpha = exp(m_old - m_new)
            m_new = torch.maximum(m_i, S_ij.amax(-1))
            m_safe = torch.where(m_new == float("-inf"), torch.zeros_like(m_new), m_new)  # no key seen yet: P = 0
            P_ij = torch.exp(S_ij - m_safe[..., None])  # P̃_ij: [B, Hq, Br, Bc]
            alpha = torch.exp(m_i - m_safe)
            l_i = alpha * l_i + P_ij.sum(-1)
            acc = alpha[..., None] * acc + torch.matmul(P_ij, V_j)
            m_i = m_new
            if trace is not None:
                trace.steps.append((i, j, m_i.clone(), l_i.clone()))
                trace.hbm_reads += 2 * per_row * K_j.shape[2] * head_dim
        # -- O_i = diag(l_i)^-1 Õ_i and L_i = m_i + log l_i; a row that saw no key has l_i = 0 -> O_i = 0, L_i = -inf
        l_safe = torch.where(l_i == 0, torch.ones_like(l_i), l_i)
        O[:, :, i0 : i0 + Br] = (acc / l_safe[..., None]).to(q.dtype)
        L[:, :, i0 : i0 + Br] = torch.where(l_i == 0, torch.full_like(l_i, float("-inf")), m_i + torch.log(l_safe))
        if trace is not None:
            trace.hbm_writes += per_row * rows * (head_dim + 1)
    return O, L


def flash_backward(q, k, v, O, L, dO, dL=None, causal=False, scale=None, window=None, alibi_slopes=None, Br=32, Bc=32):
    """FlashAttention-2 Algorithm 2 -> (dQ, dK, dV) in the dtypes of q, k, v. ``dL``: gradient of L, or None."""
    _validate(q, k, v, scale, window, alibi_slopes, Br, Bc)
    if O.shape != q.shape or dO.shape != q.shape or L.shape != q.shape[:3]:
        raise ValueError(f"O and dO must be {tuple(q.shape)} and L {tuple(q.shape[:3])}, got {tuple(O.shape)}, "
                         f"{tuple(dO.shape)}, {tuple(L.shape)}")
    compute, group, k_full, v_full, scale, slopes = _prepare(q, k, v, scale, alibi_slopes)
    q_len, kv_len = q.shape[2], k.shape[2]
    q_c, dO_c = q.to(compute), dO.to(compute)
    D = (dO_c * O.to(compute)).sum(-1)  # D = rowsum(dO ∘ O): [B, Hq, Sq]
    if dL is not None:
        D = D - dL.to(compute)  # dS = P ∘ (dP - D + dL): fold dL into D
    L_safe = torch.where(L == float("-inf"), torch.zeros_like(L), L).to(compute)  # such rows have S = -inf: P = 0
    dQ = torch.zeros_like(q_c)  # [B, Hq, Sq, D], accumulated across K/V blocks (atomic adds in the kernel)
    dK_full, dV_full = torch.zeros_like(k_full), torch.zeros_like(v_full)  # [B, Hq, Sk, D]
    for j0 in range(0, kv_len, Bc):  # outer: K/V blocks
        K_j, V_j = k_full[:, :, j0 : j0 + Bc], v_full[:, :, j0 : j0 + Bc]
        dK_j, dV_j = torch.zeros_like(K_j), torch.zeros_like(V_j)
        for i0 in range(0, q_len, Br):  # inner: Q blocks
            Q_i, dO_i = q_c[:, :, i0 : i0 + Br], dO_c[:, :, i0 : i0 + Br]
            S_ij = _tile_scores(Q_i, K_j, i0, j0, q_len, kv_len, scale, causal, window, slopes)
            if S_ij is None:
                continue
            P_ij = torch.exp(S_ij - L_safe[:, :, i0 : i0 + Br, None])  # recomputed from L: [B, Hq, Br, Bc]
            dV_j += torch.matmul(P_ij.transpose(-1, -2), dO_i)
            dP_ij = torch.matmul(dO_i, V_j.transpose(-1, -2))
            dS_ij = P_ij * (dP_ij - D[:, :, i0 : i0 + Br, None])
            dQ[:, :, i0 : i0 + Br] += scale * torch.matmul(dS_ij, K_j)
            dK_j += scale * torch.matmul(dS_ij.transpose(-1, -2), Q_i)
        dK_full[:, :, j0 : j0 + Bc], dV_full[:, :, j0 : j0 + Bc] = dK_j, dV_j
    # GQA: a KV head's gradient is the sum over the query heads of its group.
    batch, kv_heads, _, head_dim = k.shape
    dK = dK_full.view(batch, kv_heads, group, kv_len, head_dim).sum(2)
    dV = dV_full.view(batch, kv_heads, group, kv_len, head_dim).sum(2)
    return dQ.to(q.dtype), dK.to(k.dtype), dV.to(v.dtype)


class _FlashAttentionTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, window, alibi_slopes, Br, Bc):
        O, L = flash_forward(q, k, v, causal, scale, window, alibi_slopes, Br, Bc)
        ctx.save_for_backward(q, k, v, O, L, alibi_slopes)
        ctx.options = (causal, scale, window, Br, Bc)
        return O, L

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dO, dL):
        q, k, v, O, L, alibi_slopes = ctx.saved_tensors
        causal, scale, window, Br, Bc = ctx.options
        dQ, dK, dV = flash_backward(q, k, v, O, L, dO, dL, causal, scale, window, alibi_slopes, Br, Bc)
        return dQ, dK, dV, None, None, None, None, None, None


def _validate(q, k, v, scale, window, alibi_slopes, Br, Bc) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 4:
            raise ValueError(f"{name} must be [batch, heads, seq, head_dim], got shape {tuple(t.shape)}")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype in {_DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(f"k must match q's batch and head_dim, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"q's heads ({q.shape[1]}) must be a multiple of k's ({k.shape[1]})")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be a positive int or None, got {window!r}")
    for name, block in (("Br", Br), ("Bc", Bc)):
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise ValueError(f"{name} must be a positive int, got {block!r}")
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, torch.Tensor) or not alibi_slopes.is_floating_point():
            raise TypeError("alibi_slopes must be a floating-point torch.Tensor")
        if tuple(alibi_slopes.shape) not in ((q.shape[1],), (q.shape[0], q.shape[1])):
            raise ValueError(f"alibi_slopes must be [Hq] or [batch, Hq], got shape {tuple(alibi_slopes.shape)}")
        if alibi_slopes.device != q.device:
            raise ValueError(f"alibi_slopes is on {alibi_slopes.device}, q on {q.device}")


def flash_attention_torch(
    q, k, v, causal=False, scale=None, window=None, alibi_slopes=None, return_lse=False, Br=32, Bc=32
):
    """Tiled attention (FlashAttention-2, in PyTorch) in SDPA's layout, differentiable in q, k, v (and lse).

    q ``[B, Hq, Sq, D]``, k/v ``[B, Hkv, Sk, D]``; returns O ``[B, Hq, Sq, D]`` and, with
    ``return_lse``, also L ``[B, Hq, Sq]`` (fp32, fp64 for fp64 inputs). ``Br``/``Bc``: block rows of
    Q and of K/V; any positive sizes, they need not divide the sequence lengths.
    """
    O, L = _FlashAttentionTorch.apply(q, k, v, causal, scale, window, alibi_slopes, Br, Bc)
    return (O, L) if return_lse else O


if __name__ == "__main__":
    from mlsys_ref.attention.reference import attention_reference
    from mlsys_ref.testing import max_error

    q = torch.randn(2, 4, 37, 32, requires_grad=True)
    k, v = (torch.randn(2, 2, 45, 32, requires_grad=True) for _ in range(2))
    out, lse = flash_attention_torch(q, k, v, causal=True, return_lse=True, Br=16, Bc=12)
    expected, expected_lse = attention_reference(q, k, v, causal=True)
    dO = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dO)
    expected_grads = torch.autograd.grad(expected, (q, k, v), dO)
    print("FlashAttention-2 in PyTorch (GQA 4:2, causal, Sq=37, Sk=45, Br=16, Bc=12) vs reference")
    print(f"  O   max error {max_error(out, expected):.2e}")
    print(f"  lse max error {max_error(lse, expected_lse):.2e}")
    for name, g, e in zip(("dQ", "dK", "dV"), grads, expected_grads):
        print(f"  {name}  max error {max_error(g, e):.2e}")
