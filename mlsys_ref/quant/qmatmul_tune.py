"""A tiny autotuner for the quantized-matmul kernels: time the candidates once per shape bucket.

What ``triton.autotune`` does, spelled out in 40 lines so that the rules are visible (and identical on
every Triton version): a kernel has a short list of candidate configs; the first call with a new key
(M bucket, N, K, format, dtype) times every candidate (one launch captured in a CUDA graph, timed by
``triton.testing.do_bench`` in two passes over all candidates) and keeps the fastest; later calls with
that key reuse it. Under the interpreter there is ONE config (the first), and while a CUDA graph is being
captured nothing is timed (timing would launch kernels into the graph): an untuned key then takes the
first candidate, so warm up before capturing.

Left out: persisting the choices to disk (Triton's own compile cache still makes re-runs fast).
"""

from __future__ import annotations

from typing import Callable, Hashable, Sequence

import torch

from mlsys_ref.backend import is_interpreter

__all__ = ["pick_config", "tuned_configs", "m_bucket", "gemv_configs", "gemm_configs", "mma_configs"]

_BEST: dict[Hashable, dict] = {}  # (kernel name, key) -> the winning config
ROUNDS = 2  # timing passes over the candidates


def m_bucket(M: int) -> int:
    """Autotune buckets for the number of tokens: 1, 16 (GEMV path), then powers of two."""
    if M <= 1:
        return 1
    if M <= 16:
        return 16
    return 1 << (M - 1).bit_length()


def pick_config(name: str, key: Hashable, candidates: Sequence[dict], launch: Callable[[dict], object],
                repeat: int = 1) -> dict:
    """The config to launch ``name`` with for ``key``; times ``launch(config)`` for each candidate, ROUNDS times.
    ``repeat`` > 1 times that many launches back to back in one graph (kernels that overlap their neighbours, as
    chained GEMVs do, are judged in a chain; ``launch`` then picks its own buffers per call)."""
    if not candidates:
        raise ValueError(f"{name}: no candidate configs for key {key}")
    if is_interpreter() or len(candidates) == 1:
        return candidates[0]
    full_key = (name, key)
    if full_key in _BEST:
        return _BEST[full_key]
    if torch.cuda.is_current_stream_capturing():
        return candidates[0]  # never time inside a graph capture
    from triton.testing import do_bench

    graphs, failures = [], []
    for index, config in enumerate(candidates):
        try:
            launch(config)  # compile (and surface a bad config) outside the capture
            # time one launch replayed from a CUDA graph: a 3 µs GEMV would otherwise be timed as the
            # ~30 µs of Python that launches it; do_bench clears the L2 before each replay
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(repeat):
                    launch(config)
            graphs.append((index, graph))
        except Exception as error:  # e.g. out of shared memory for this tile: skip the candidate
            failures.append(f"{config}: {type(error).__name__}: {error}")
    # ROUNDS passes over all candidates, each keeping its fastest median: one pass right after its own compile
    # (or in a slow stretch of the GPU's clocks) does not decide a candidate (on the H100, two int8 GEMVs 2%
    # apart were otherwise picked either way from run to run)
    best: dict[int, float] = {}
    for _ in range(ROUNDS):
        for index, graph in graphs:
            best[index] = min(best.get(index, float("inf")), do_bench(graph.replay, warmup=5, rep=25))
    del graphs
    if not best:
        raise RuntimeError(f"{name}: every candidate config failed for key {key}:\n" + "\n".join(failures))
    _BEST[full_key] = candidates[min(best, key=lambda index: (best[index], index))]
    return _BEST[full_key]


def tuned_configs() -> dict[Hashable, dict]:
    """What the tuner chose so far (benchmarks print it)."""
    return dict(_BEST)


# -- configs: ONE per path under the interpreter (big tiles: the interpreter pays per program, not per element)
def gemv_configs(bits: int = 4) -> list[dict]:
    """M = 1: (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages). The GEMV is latency-bound: bytes in flight come
    from many programs (split-K) and from prefetching, either the register double buffer (num_stages = 1) or
    Triton's cp.async pipeline (num_stages > 1); rows per thread amortize the x unpacking. int8 steps are half
    as many codes (the same 16 words, 64 bytes, per row)."""
    if is_interpreter():
        return [dict(BLOCK_N=32, BLOCK_K=128, SPLIT_K=2, num_warps=4, num_stages=1)]
    # H100 sweep (triton 3.6): 1-2 warps and 8-16 splits win; the register double buffer and the pipeline tie;
    # 256-code steps with 2-4 warps at N = 11008 (16.0 µs against 17.1 for the others' best); int8, 16 rows a warp
    # at 4096² and 4096 x 11008 (11.1 and 22.8 µs against 11.3 and 23.5); seventh session: int8 16 rows x 256
    # codes on 2 warps, split-K 4 (10.9 / 23.2 / 22.0 µs on the three shapes, 2-3% under the others' best),
    # int4 16 rows x 256 codes on 1 warp, split-K 4, 2 stages at 11008 x 4096 (15.4 against 16.1 µs)
    table = [(64, 128, 8, 2, 1), (64, 128, 16, 2, 1), (32, 256, 8, 1, 3), (64, 128, 8, 2, 3), (32, 128, 8, 1, 3),
             (32, 256, 16, 1, 3), (64, 128, 16, 2, 3), (128, 128, 16, 4, 1), (128, 256, 8, 4, 1), (64, 256, 8, 2, 1),
             (16, 256, 8, 1, 3), (16, 512, 4, 2, 3), (16, 256, 4, 1, 2)]
    return [dict(BLOCK_N=n, BLOCK_K=k // (bits // 4), SPLIT_K=s, num_warps=w, num_stages=st) for n, k, s, w, st in table]


def gemm_configs(M: int) -> list[dict]:
    """M >= 2: (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages, FOLD, ASM[, IL[, TMA]]); M <= 16 is the skinny,
    GEMV-like regime (one 16-row tile, split-K), larger M the tiled GEMM. FOLD = 1: exact codes in the dot,
    scales applied per chunk to the [BLOCK_N, BLOCK_M] product (cheap when BLOCK_M is small); FOLD = 0: scales
    per weight (cheap when BLOCK_M is large). ASM = 1: int4 codes by inline PTX (GPU, 16-bit x; see nibble_ptx;
    an optional PACK, default 4, is the bytes per call); IL = 1 puts them back in k order, so x is read as stored
    and the MMA of one chunk overlaps the next chunk's dequantization (the tiled GEMM; one dot per chunk instead
    of two); TMA = 1 (with IL) loads x's tiles through a tensor descriptor."""
    if is_interpreter():
        return [dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, SPLIT_K=2, num_warps=4, num_stages=1, FOLD=1, ASM=0) if M <= 16
                else dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, SPLIT_K=1, num_warps=4, num_stages=1, FOLD=0, ASM=0)]
    if M <= 16:
        # H100 sweep (inline PTX on 4 bytes a call): 1-2 warps, split-K 4 (K = 4096) or 8 (K = 11008)
        table = [(16, 64, 128, 4, 2, 3, 1, 1), (16, 32, 128, 4, 1, 3, 1, 1), (16, 64, 128, 8, 1, 3, 1, 1),
                 (16, 64, 128, 8, 2, 3, 1, 1), (16, 128, 128, 8, 2, 3, 1, 1), (16, 64, 128, 4, 4, 3, 0, 1)]
    elif M <= 64:  # few rows: still the weight stream, with the skinny kernel's split-K
        table = [(64, 64, 128, 4, 4, 3, 1, 1), (32, 64, 128, 4, 2, 3, 1, 1), (64, 64, 128, 2, 4, 3, 0, 1),
                 (64, 128, 128, 2, 8, 3, 0, 1), (128, 128, 128, 1, 8, 3, 0, 1, 1), (64, 128, 64, 1, 4, 3, 0, 1, 1)]
    else:  # H100 sweep at M = 256: all 256 rows in one tile, x by TMA (the 10th field), split-K to fill the SMs
        table = [(256, 64, 128, 2, 4, 3, 0, 1, 1, 1), (256, 128, 128, 1, 8, 3, 0, 1, 1, 1), (256, 128, 128, 4, 8, 3, 0, 1, 1, 1),
                 (128, 128, 128, 2, 8, 3, 0, 1, 1, 1),
                 (128, 128, 128, 2, 8, 3, 0, 1, 1), (128, 128, 128, 1, 8, 3, 0, 1, 1), (64, 128, 64, 1, 4, 3, 0, 1, 1),
                 (128, 128, 64, 1, 8, 3, 0, 1, 0), (128, 128, 64, 1, 8, 3, 0, 0, 0)]
    table = [(*row, 0, 0)[:10] for row in table]  # IL and TMA default to 0
    return [dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, SPLIT_K=s, num_warps=w, num_stages=st, FOLD=f, ASM=a, IL=il, TMA=tma)
            for m, n, k, s, w, st, f, a, il, tma in table]


def mma_configs(M: int) -> list[dict]:
    """The fragment-layout kernel (qmatmul_mma): (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages, LAST,
    TMA). BLOCK_N is a multiple of 16 (whole MMA row slabs), BLOCK_K of 128 (whole units); num_stages > 1
    pipelines the weight through shared memory with cp.async; LAST = 1 sums split-K partials in the kernel (the
    last program of a tile), else a second kernel does; TMA = 1 brings x's tiles by a tensor descriptor, 0 by
    cp.async with the weight (no barrier set-up: faster at M = 1)."""
    if is_interpreter():
        return [dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, SPLIT_K=2, num_warps=4, num_stages=1, LAST=1, TMA=1)]
    if M <= 16:  # H100 sweep (triton 3.6): 4 warps x 64 rows, 128-code steps 3-4 deep, split-K 2-8 summed in-kernel
        table = [(16, 64, 128, 4, 4, 4, 1, 0), (16, 64, 128, 2, 4, 4, 1, 0), (16, 64, 128, 8, 4, 3, 1, 0),
                 (16, 64, 128, 4, 4, 4, 1, 1), (16, 64, 128, 2, 4, 4, 1, 1), (16, 64, 128, 8, 4, 3, 1, 1),
                 (16, 64, 256, 4, 4, 3, 1, 0), (16, 128, 128, 4, 8, 3, 1, 0)]
    else:  # M = 64 sweep; larger M (the row-major GEMM is faster there) gets the same tiles, M-tiled
        table = [(64, 64, 128, 4, 4, 3, 0, 1), (64, 64, 128, 2, 4, 3, 0, 1), (64, 128, 128, 2, 8, 3, 0, 1),
                 (64, 128, 128, 4, 8, 3, 0, 1), (64, 64, 128, 4, 4, 3, 0, 0)]
    return [dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, SPLIT_K=s, num_warps=w, num_stages=st, LAST=last, TMA=tma)
            for m, n, k, s, w, st, last, tma in table]


if __name__ == "__main__":
    print("M -> autotune bucket:", {M: m_bucket(M) for M in (1, 2, 16, 17, 64, 100, 256, 1000)})
    print("interpreter: one config, no timing" if is_interpreter() else "GPU: each new key times its candidates")
