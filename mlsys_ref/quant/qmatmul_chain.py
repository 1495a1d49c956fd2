"""GEMVs that follow one another, overlapped with programmatic dependent launch (Hopper).

Source: NVIDIA, CUDA C++ Programming Guide, "Programmatic Dependent Launch and Synchronization", and the PTX ISA's
``griddepcontrol``. At batch 1 each GEMV streams its weight in a few microseconds, and a call's fixed cost -- the
launch, the HBM ramp, the last programs' tail, ~2.4 µs in a CUDA graph even for a plain read of the weight on the
H100 -- is a fifth of it. A kernel launched as a *programmatic dependent* may start while the kernel before it is
still running, once that one lets it (``griddepcontrol.launch_dependents``); it must then wait
(``griddepcontrol.wait``) before reading anything the kernel before writes.

The one idea to notice: a GEMV's weight is constant, only x comes from the kernel before. So the GEMV issues its
first weight loads, *then* waits, and at once lets the next GEMV start: one GEMV's ramp runs under the other's
tail. That pays only where the kernel before lets it start early -- another GEMV. After PyTorch's kernels, which
never do, a dependent launch only costs (~0.3 µs a GEMV on the H100, quant_notes.md). So it is a block the caller
opens where GEMVs follow one another (q, k, v of a token; gate and up), not the default. The M = 1 tuner keys
chained calls apart and times them in a chain (:func:`chain_timing`): the best lone config is not the best chained.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch

from mlsys_ref.backend import triton

__all__ = ["chained_gemvs", "in_chain", "break_chain", "chain_launch", "chain_timing"]

_CHAIN: list[bool] = []  # one entry per open chained_gemvs() block: whether a GEMV was launched in it


@contextlib.contextmanager
def chained_gemvs():
    """``with chained_gemvs():`` -- the GEMVs launched in the block follow one another, so on Hopper each may
    start while the one before it finishes. Every GEMV of the block is compiled to wait for the kernel before it
    only where it reads x and to let the next kernel start at once; every one but the first is launched as a
    dependent. The caller's promise: the kernel just before a GEMV of the block does not write that GEMV's weight
    (its first words are read before the wait); x, scales and the output are safe whatever ran before. Elsewhere
    (no Hopper, the interpreter, the other kernels) the block changes nothing."""
    _CHAIN.append(False)
    try:
        yield
    finally:
        _CHAIN.pop()


def in_chain() -> bool:
    """Whether a :func:`chained_gemvs` block is open (the M = 1 tuner keys and times its configs by it)."""
    return bool(_CHAIN)


def break_chain() -> None:
    """The next GEMV of the open block is launched as a first one (e.g. after its weight was just written)."""
    if _CHAIN:
        _CHAIN[-1] = False


def chain_launch(hopper: bool) -> tuple[bool, bool]:
    """(compile with the PDL instructions, launch as a dependent) for a GEMV launched now; marks the launch."""
    if not (_CHAIN and hopper):
        return False, False
    dependent, _CHAIN[-1] = _CHAIN[-1], True
    return True, dependent


def chain_timing(launch: Callable[[dict, tuple], object],
                 tensors: Sequence[torch.Tensor | None]) -> tuple[Callable[[dict], None], int]:
    """(timed launch, repeat) for the tuner to time GEMVs that follow one another: ``launch(config, weights)``
    with each call on the next of ``repeat`` scratch copies of the weight ``tensors``, together twice the L2 or
    more (a decode step's chain reads fresh weights each time). Allocated on the first timed call and freed with
    the tuner's graphs; their contents (uninitialized) do not change the time."""
    weight_bytes = sum(t.numel() * t.element_size() for t in tensors if t is not None)
    l2_bytes = torch.cuda.get_device_properties(tensors[0].device).L2_cache_size
    repeat = max(2, min(32, triton.cdiv(2 * l2_bytes, weight_bytes)))
    copies: list[tuple] = []
    turn = 0

    def timed(config: dict) -> None:
        nonlocal turn
        if not copies:
            copies.extend(tuple(None if t is None else torch.empty_like(t) for t in tensors) for _ in range(repeat))
        launch(config, copies[turn % repeat])
        turn += 1

    return timed, repeat
