"""HBM traffic of standard attention and of FlashAttention, counted in elements read + written.

Dao et al. 2022, "FlashAttention", arXiv 2205.14135, §3.2, Theorem 2: for sequence length ``N``,
head dim ``d`` and SRAM of ``M`` elements (``d <= M <= Nd``), standard attention (their Algorithm 0)
makes Θ(Nd + N²) HBM accesses and FlashAttention (Algorithm 1) Θ(N²d²/M); Proposition 3 shows no
exact algorithm does asymptotically better for every M in [d, Nd]. FlashAttention-2 (Dao 2023, arXiv
2307.08691, Algorithm 1) swaps the loops (Q blocks outer), which keeps the same order of traffic.

For softmax alone (Milakov & Gimelshein 2018, arXiv 1805.02867, §2-3), `softmax_hbm` counts the
memory accesses per row of the naive, safe (three-pass) and online (two-pass) algorithms.

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
    "softmax_hbm",
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


_SOFTMAX_PASSES = {"naive": 2, "safe": 3, "online": 2}  # reads of the row: Algorithms 1, 2 and 3


def softmax_hbm(n: int, algorithm: str, on_chip: int | None = None) -> int:
    """Elements read + written to softmax a row of ``n``: one write, and 2 (naive, Alg. 1), 3 (safe,
    Alg. 2) or 2 (online, Alg. 3) reads. With ``on_chip`` elements of registers/SRAM per row, a row
    that fits is read once and kept there (what the Triton kernel does): ``2n`` for every algorithm.
    """
    _check_positive(n=n)
    if algorithm not in _SOFTMAX_PASSES:
        raise ValueError(f"algorithm must be one of {sorted(_SOFTMAX_PASSES)}, got {algorithm!r}")
    if on_chip is not None:
        _check_positive(on_chip=on_chip)
        if n <= on_chip:
            return 2 * n
    return (_SOFTMAX_PASSES[algorithm] + 1) * n


if __name__ == "__main__":
    d = 64
    print(f"HBM accesses (elements) of one head's forward, d = {d}; FlashAttention with SRAM of M elements")
    print(f"{'N':>6} {'standard':>12} " + " ".join(f"{'M=' + str(M):>12}" for M in (2**14, 2**16, 2**18)))
    for N in (1024, 4096, 16384):
        flash = " ".join(f"{flash1_hbm(N, d, M):12d}" for M in (2**14, 2**16, 2**18))
        print(f"{N:6d} {standard_attention_hbm(N, d):12d} {flash}")
