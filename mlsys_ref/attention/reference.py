"""Reference attention: softmax(Q Kᵀ · scale + bias + mask) V, materialized. Obviously correct, O(S²) memory.

Vaswani et al. 2017, "Attention Is All You Need", §3.2.1 (scaled dot-product attention), with the
variants the kernels support:
- causal masking, aligned **bottom-right** when ``q_len != kv_len``: query ``i`` sits at key position
  ``i + kv_len - q_len``, so the last query sees every key (decoding with a KV cache);
- a sliding window (Beltagy et al. 2020, Longformer §3.1; Mistral 7B): a query at position ``p``
  sees key ``j`` only if ``p - window < j`` (and, without ``causal``, ``j < p + window``);
- ALiBi (Press et al. 2022, §3): bias ``-slope_h · |p - j|`` per head;
- grouped-query / multi-query attention (Ainslie et al. 2023): ``Hq`` a multiple of ``Hkv``,
  query head ``h`` reads KV head ``h // (Hq / Hkv)``.

A row that sees no key returns output 0 and lse -inf, never NaN. Everything here is computed in
fp32 (fp64 for fp64 inputs); the output is cast back to the input dtype, the lse stays fp32/fp64.
This is the module tests, the tour, notebooks and benchmarks compare against.
"""

from __future__ import annotations

import math

import torch

__all__ = ["visible_keys", "attention_bias", "attention_reference", "attention_varlen_reference"]


def _tile_positions(q_len, kv_len, q_start, k_start, q_end, k_end, device):
    """Key position of each query row ``[q_rows, 1]`` (bottom-right alignment) and key index ``[1, k_cols]``."""
    query_index = torch.arange(q_start, q_len if q_end is None else q_end, device=device)[:, None]
    key_index = torch.arange(k_start, kv_len if k_end is None else k_end, device=device)[None, :]
    return query_index + (kv_len - q_len), key_index


def visible_keys(
    q_len: int,
    kv_len: int,
    causal: bool = False,
    window: int | None = None,
    device: torch.device | str = "cpu",
    q_start: int = 0,
    k_start: int = 0,
    q_end: int | None = None,
    k_end: int | None = None,
) -> torch.Tensor:
    """Boolean ``[q_rows, k_cols]`` mask of which keys each query sees (True = visible).

    ``q_start``/``q_end`` and ``k_start``/``k_end`` select a tile: rows ``q_start:q_end`` of ``q_len``
    queries and columns ``k_start:k_end`` of ``kv_len`` keys (ends default to the lengths), so tiled
    implementations (flash_torch) ask for one block's mask.
    """
    position, key_index = _tile_positions(q_len, kv_len, q_start, k_start, q_end, k_end, device)
    visible = torch.ones(position.shape[0], key_index.shape[1], dtype=torch.bool, device=device)
    if causal:
        visible &= key_index <= position
    if window is not None:
        visible &= key_index > position - window
        if not causal:
            visible &= key_index < position + window
    return visible


def attention_bias(
    q_len: int,
    kv_len: int,
    alibi_slopes: torch.Tensor,
    q_start: int = 0,
    k_start: int = 0,
    q_end: int | None = None,
    k_end: int | None = None,
) -> torch.Tensor:
    """ALiBi bias ``-slope · |p - j|`` of shape ``[..., heads, q_rows, k_cols]`` (slopes ``[heads]`` or ``[batch, heads]``);
    the tile arguments are visible_keys'."""
    position, key_index = _tile_positions(q_len, kv_len, q_start, k_start, q_end, k_end, alibi_slopes.device)
    distance = (position - key_index).abs().to(alibi_slopes.dtype)
    return -alibi_slopes[..., None, None] * distance


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    scale: float | None = None,
    window: int | None = None,
    alibi_slopes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Materialized attention. q ``[B, Hq, Sq, D]``, k/v ``[B, Hkv, Sk, D]`` -> (O ``[B, Hq, Sq, D]``, lse ``[B, Hq, Sq]``).

    ``lse`` is the natural-log log-sum-exp of the scaled, biased, masked scores of each row.
    Differentiable through autograd, so it is also the reference for gradients.
    """
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    if q_heads % kv_heads:
        raise ValueError(f"q has {q_heads} heads, not a multiple of k's {kv_heads}")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = q_heads // kv_heads
    k_full = k.to(compute).repeat_interleave(group, dim=1)  # [B, Hq, Sk, D]
    v_full = v.to(compute).repeat_interleave(group, dim=1)

    scores = torch.matmul(q.to(compute), k_full.transpose(-1, -2)) * scale  # S: [B, Hq, Sq, Sk]
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(compute)
        bias = attention_bias(q_len, kv_len, slopes)  # [Hq, Sq, Sk] or [B, Hq, Sq, Sk]
        scores = scores + bias
    visible = visible_keys(q_len, kv_len, causal, window, device=q.device)
    scores = scores.masked_fill(~visible, float("-inf"))

    lse = torch.logsumexp(scores, dim=-1)  # [B, Hq, Sq]; -inf for rows that see nothing
    # exp(S - lse) is softmax; rows with lse = -inf would give NaN, so give them lse 0 (P = 0).
    safe_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    probabilities = torch.exp(scores - safe_lse[..., None])  # P
    out = torch.matmul(probabilities, v_full)  # O = P V
    return out.to(q.dtype), lse


def attention_varlen_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    causal: bool = False,
    scale: float | None = None,
    window: int | None = None,
    alibi_slopes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed variable-length batch: q ``[total_q, Hq, D]``, k/v ``[total_k, Hkv, D]``, sequence ``i``
    spanning ``cu_seqlens[i]:cu_seqlens[i+1]``. Returns (O ``[total_q, Hq, D]``, lse ``[Hq, total_q]``).

    Each sequence is attended on its own (one reference call per sequence): obviously correct.
    """
    outputs, lses = [], []
    for i in range(cu_seqlens_q.numel() - 1):
        q_slice = slice(int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1]))
        k_slice = slice(int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1]))
        out, lse = attention_reference(
            q[q_slice].transpose(0, 1)[None],
            k[k_slice].transpose(0, 1)[None],
            v[k_slice].transpose(0, 1)[None],
            causal=causal,
            scale=scale,
            window=window,
            alibi_slopes=alibi_slopes,
        )
        outputs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    return torch.cat(outputs, dim=0), torch.cat(lses, dim=-1)


if __name__ == "__main__":
    import torch.nn.functional as F

    q, k, v = (torch.randn(2, 4, 37, 32, dtype=torch.float64) for _ in range(3))
    out, _ = attention_reference(q, k, v, causal=True)
    error = (out - F.scaled_dot_product_attention(q, k, v, is_causal=True)).abs().max().item()
    print(f"attention_reference causal, seq 37, d 32 (fp64): max |O - torch SDPA| = {error:.2e}")
