"""A tiny autotuner for the quantized-matmul kernels: time each candidate once per shape bucket.

What ``triton.autotune`` does, spelled out in 40 lines so that the rules are visible (and identical on
every Triton version): a kernel has a short list of candidate configs; the first call with a new key
(M bucket, N, K, format, dtype) times every candidate (one launch captured in a CUDA graph, timed by
``triton.testing.do_bench``) and keeps the fastest; later calls with that key reuse it. Under the
interpreter there is ONE config (the first), and while a CUDA graph is being captured nothing is timed
(timing would launch kernels into the graph): an untuned key then takes the first candidate, so warm
up before capturing.

Left out: persisting the choices to disk (Triton's own compile cache still makes re-runs fast).
"""

from __future__ import annotations

from typing import Callable, Hashable, Sequence

import torch

from mlsys_ref.backend import is_interpreter

__all__ = ["pick_config", "tuned_configs", "m_bucket"]

_BEST: dict[Hashable, dict] = {}  # (kernel name, key) -> the winning config


def m_bucket(M: int) -> int:
    """Autotune buckets for the number of tokens: 1, 16 (GEMV path), then powers of two."""
    if M <= 1:
        return 1
    if M <= 16:
        return 16
    return 1 << (M - 1).bit_length()


def pick_config(name: str, key: Hashable, candidates: Sequence[dict], launch: Callable[[dict], object]) -> dict:
    """The config to launch ``name`` with for ``key``; times ``launch(config)`` for each candidate once."""
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

    timings, failures = [], []
    for config in candidates:
        try:
            launch(config)  # compile (and surface a bad config) outside the capture
            # time one launch replayed from a CUDA graph: a 3 µs GEMV would otherwise be timed as the
            # ~30 µs of Python that launches it; do_bench clears the L2 before each replay
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                launch(config)
            timings.append((do_bench(graph.replay, warmup=5, rep=25), len(timings), config))
            del graph
        except Exception as error:  # e.g. out of shared memory for this tile: skip the candidate
            failures.append(f"{config}: {type(error).__name__}: {error}")
    if not timings:
        raise RuntimeError(f"{name}: every candidate config failed for key {key}:\n" + "\n".join(failures))
    _BEST[full_key] = min(timings, key=lambda t: (t[0], t[1]))[2]
    return _BEST[full_key]


def tuned_configs() -> dict[Hashable, dict]:
    """What the tuner chose so far (benchmarks print it)."""
    return dict(_BEST)


if __name__ == "__main__":
    print("M -> autotune bucket:", {M: m_bucket(M) for M in (1, 2, 16, 17, 64, 100, 256, 1000)})
    print("interpreter: one config, no timing" if is_interpreter() else "GPU: each new key times its candidates")
