"""The tour: every technique, at small sizes, checked against its naive reference.

Each area (attention, quant, serving, parallel) lists its checks in ``mlsys_ref/<area>/checks.py``
as ``CHECKS: list[Check]``; the tour runs them in order, prints progress as it goes, then
one row per technique, and returns non-zero if any row fails. ``make tour`` and
``python -m mlsys_ref tour`` both land here.
"""

from __future__ import annotations

import importlib
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable

import torch

from mlsys_ref import backend

AREAS = ("attention", "quant", "serving", "parallel")


@dataclass(frozen=True)
class Check:
    """One tour row. ``run(device)`` returns ``(max_error, tolerance)``; ok means error <= tolerance."""

    technique: str
    paper: str
    run: Callable[[torch.device], tuple[float, float]]


@dataclass
class Row:
    area: str
    technique: str
    paper: str
    backend: str
    max_error: float
    tolerance: float
    ok: bool
    seconds: float
    failure: str = ""


def collect(only: str | None = None) -> list[tuple[str, Check]]:
    """The checks of every area (or just ``only``) whose checks module exists."""
    if only is not None and only not in AREAS:
        raise ValueError(f"only must be one of {AREAS}, got {only!r}")
    found = []
    for area in AREAS if only is None else (only,):
        try:
            module = importlib.import_module(f"mlsys_ref.{area}.checks")
        except ModuleNotFoundError as error:
            if error.name == f"mlsys_ref.{area}.checks":
                continue  # that area has no techniques yet
            raise
        found.extend((area, check) for check in module.CHECKS)
    return found


def run_tour(only: str | None = None, device: str | None = None, stream=sys.stdout) -> int:
    """Run the checks, print the table, return the process exit code (0 when all rows pass)."""
    target = torch.device(device) if device else backend.default_device()
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but torch sees no CUDA device")
    if target.type == "cuda" and backend.is_interpreter():
        raise ValueError(
            "device 'cuda' was asked for, but kernels run under the Triton interpreter (your setting, read by "
            "mlsys_ref.backend at import): leave the interpreter off to run on the GPU"
        )
    if target.type == "cpu" and torch.cuda.is_available() and not backend.is_interpreter():
        raise ValueError(
            "device 'cpu' needs the Triton interpreter, chosen at import time: "
            "switch the interpreter on as mlsys_ref/backend.py describes to run on the CPU of a machine with a GPU"
        )
    checks = collect(only)
    label = backend.backend_name()
    print(f"mlsys_ref tour on {target} ({label}), {len(checks)} checks", file=stream, flush=True)
    rows: list[Row] = []
    for index, (area, check) in enumerate(checks, start=1):
        print(f"[{index}/{len(checks)}] {area}: {check.technique} ...", file=stream, flush=True, end=" ")
        start = time.perf_counter()
        try:
            error, bound = check.run(target)
            ok, failure = bool(error <= bound), ""
        except Exception as exception:  # a crash is a failed row, not a crashed tour
            error, bound, ok = float("nan"), float("nan"), False
            failure = "".join(traceback.format_exception_only(type(exception), exception)).strip()
        seconds = time.perf_counter() - start
        rows.append(Row(area, check.technique, check.paper, label, error, bound, ok, seconds, failure))
        print(f"{'ok' if ok else 'FAIL'} ({seconds:.1f}s)", file=stream, flush=True)
    print_table(rows, stream)
    failed = [row for row in rows if not row.ok]
    for row in failed:
        if row.failure:
            print(f"{row.technique}: {row.failure}", file=stream)
    if not rows:
        print("no checks found: nothing was verified", file=stream)
        return 1
    print(f"{len(rows) - len(failed)} passed, {len(failed)} failed", file=stream)
    return 1 if failed else 0


def print_table(rows: list[Row], stream=sys.stdout) -> None:
    header = ("technique", "paper", "backend", "max error", "tolerance", "ok", "seconds")
    cells = [
        (r.technique, r.paper, r.backend, f"{r.max_error:.2e}", f"{r.tolerance:.1e}", "ok" if r.ok else "FAIL", f"{r.seconds:.2f}")
        for r in rows
    ]
    widths = [max(len(str(c)) for c in column) for column in zip(header, *cells)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    print("\n" + line + "\n" + "-" * len(line), file=stream)
    for cell in cells:
        print("  ".join(str(c).ljust(w) for c, w in zip(cell, widths)), file=stream)
