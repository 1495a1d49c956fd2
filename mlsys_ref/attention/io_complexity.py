"""HBM traffic of standard attention and of FlashAttention, counted in elements read + written.

Dao et al. 2022, "FlashAttention", arXiv 2205.14135, §3.2, Theorem 2: for sequence length ``N``,
head dim ``d`` and SRAM of ``M`` elements (``d <= M <= Nd``), standard attention (their Algorithm 0)
makes Θ(Nd + N²) HBM accesses and FlashAttention (Algorithm 1) Θ(N²d²/M); Proposition 3 shows no
exact algorithm does asymptotically better for every M in [d, Nd]. FlashAttention-2 (Dao 2023, arXiv
2307.08691, Algorithm 1) swaps the loops (Q blocks outer), which keeps the same order of traffic.

These functions count exactly what each algorithm's lines load and store, for one (batch, head),
forward only, no masking (causal block skipping would roughly halve the tiled counts). The
PyTorch tiled forward (`flash_torch.flash_forward`) tallies its own loads and stores as it runs,
and the tests check that tally equals `flash2_forward_hbm`.

The one idea to notice: the tiled algorithm re-reads K and V once per Q block, so its traffic is
N/Br passes over K and V; a larger SRAM means larger blocks, fewer passes, less traffic, while the
standard algorithm's N² term (writing and re-reading S and P) does not care how big SRAM is.
"""

from __future__ import annotations

import math

__all__ = [
    "standard_attention_hbm",
    "flash1_block_sizes",
    "flash1_hbm",
    "flash2_block_size",
    "flash2_forward_hbm",
]


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def standard_attention_hbm(N: int, d: int) -> int:
    """Algorithm 0 of FlashAttention: S = QKᵀ, P = softmax(S), O = PV, each step through HBM.

    load Q, K (2Nd), write S (N²); read S (N²), write P (N²); read P (N²) and V (Nd), write O (Nd).
    """
    _check_positive(N=N, d=d)
    return 4 * N * d + 4 * N * N


def flash1_block_sizes(M: int, d: int, N: int | None = None) -> tuple[int, int]:
    """FlashAttention Algorithm 1, line 1: ``Bc = ⌈M / 4d⌉``, ``Br = min(⌈M / 4d⌉, d)`` (clipped to N)."""
    _check_positive(M=M, d=d)
    Bc = math.ceil(M / (4 * d))
    Br = min(Bc, d)
    if N is not None:
        Bc, Br = min(Bc, N), min(Br, N)
    return Br, Bc


def flash1_hbm(N: int, d: int, M: int) -> int:
    """FlashAttention Algorithm 1 (K/V blocks outer, Q blocks inner), as in the proof of Theorem 2.

    line 2: write O, l, m (Nd + 2N); line 6: load each Kj, Vj once (2Nd); for each of the Tc outer
    steps, lines 8 and 12-13: read and write back every Qi, Oi, li, mi (Nd + Nd + 2N reads, Nd + 2N writes).
    """
    _check_positive(N=N, d=d, M=M)
    _, Bc = flash1_block_sizes(M, d, N)
    Tc = math.ceil(N / Bc)
    return (N * d + 2 * N) + 2 * N * d + Tc * (3 * N * d + 4 * N)


def flash2_block_size(M: int, d: int) -> int:
    """The largest B with Br = Bc = B whose working set fits SRAM: Qi, Oi, Kj, Vj (4Bd) plus S (B²) <= M."""
    _check_positive(M=M, d=d)
    B = math.isqrt(4 * d * d + M) - 2 * d  # root of B² + 4dB - M
    if B < 1:
        raise ValueError(f"SRAM of M={M} elements cannot hold even one row of each block at d={d}")
    return B


def flash2_forward_hbm(q_len: int, kv_len: int, d: int, Br: int) -> int:
    """FlashAttention-2 Algorithm 1 (Q blocks outer): per Q block load Qi once, every Kj and Vj once,
    write Oi and the log-sum-exp Li once. ``Tr = ⌈q_len / Br⌉``; Bc does not change the count.
    """
    _check_positive(q_len=q_len, kv_len=kv_len, d=d, Br=Br)
    Tr = math.ceil(q_len / Br)
    return q_len * d + Tr * 2 * kv_len * d + q_len * d + q_len
