"""Shared benchmark plumbing: timing, the GPU's ceilings, and writing results.

Every benchmark times with ``triton.testing.do_bench`` (CUDA events, median with 20th/80th
percentiles; ``bench_graph`` replays a CUDA graph instead, for launch-bound calls such as decode steps), reports its unit (TFLOP/s, TB/s, tokens/s) against the datasheet peak *and* against
a ceiling measured in the same run (a device-to-device copy, a cuBLAS matmul), and writes
``<name>.csv``, ``<name>.md`` and ``<name>.png`` under ``benchmarks/results/<gpu>/``.
"""

from __future__ import annotations

import csv
import datetime
import platform
import re
import time
import traceback
from pathlib import Path
from typing import Callable, Sequence

import torch

RESULTS = Path(__file__).resolve().parent / "results"

# Dense (no sparsity) datasheet peaks: bf16 tensor-core TFLOP/s and HBM TB/s.
DATASHEET = {
    "h100-sxm": {"bf16_tflops": 989.0, "hbm_tbps": 3.35},
    "h100-pcie": {"bf16_tflops": 756.0, "hbm_tbps": 2.0},
    "h200": {"bf16_tflops": 989.0, "hbm_tbps": 4.8},
}


def sync(device) -> None:
    """Wait for the GPU (nothing to wait for on the CPU): wall-clock timings of whole runs need it."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def section(name: str, function, *args, since: float | None = None) -> None:
    """Run one benchmark section and print its time; ``since``: also print the time elapsed from it.
    A failing section is reported and skipped, so one failure does not lose the others."""
    print(f"== {name}" + (f" (t = {time.perf_counter() - since:.0f} s)" if since is not None else ""), flush=True)
    start = time.perf_counter()
    try:
        function(*args)
    except Exception as error:  # one failing section must not lose the others
        print(f"   SKIPPED {name}: {type(error).__name__}: {error}")
        traceback.print_exc(limit=4)
    print(f"   ({time.perf_counter() - start:.1f} s)", flush=True)


def require_cuda(script: str) -> None:
    if not torch.cuda.is_available():
        raise SystemExit(f"{script} measures GPU kernels and needs a CUDA device; none is visible.")


def gpu_slug() -> str:
    """A folder name for this GPU: 'h100-sxm', 'h200', ... (falls back to the device name, slugged)."""
    name = torch.cuda.get_device_name(0).lower()
    if "h200" in name:
        return "h200"
    if "h100" in name:
        return "h100-pcie" if "pcie" in name else "h100-sxm"
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def datasheet() -> dict[str, float]:
    return DATASHEET.get(gpu_slug(), {"bf16_tflops": float("nan"), "hbm_tbps": float("nan")})


def bench(function: Callable[[], object], warmup_ms: int = 25, repeat_ms: int = 100) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of ``function()`` measured with CUDA events."""
    from triton.testing import do_bench

    median, p20, p80 = do_bench(function, warmup=warmup_ms, rep=repeat_ms, quantiles=[0.5, 0.2, 0.8])
    return median, p20, p80


def bench_graph(make_call: Callable[[int], Callable[[], object]], copies: int = 1, calls: int = 20,
                repeats: int = 15) -> tuple[float, float, float]:
    """(median, p20, p80) ms per call under CUDA-graph replay, as a server runs decode steps: ``calls`` calls
    captured in one graph (no host launch cost), call i on input copy ``i % copies`` (enough copies that the
    working set exceeds L2, so each call reads cold HBM as do_bench's L2 flush makes it)."""
    functions = [make_call(i % copies) for i in range(calls)]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile, autotune, cuDNN plans: all before capture, on a side stream
        for function in functions[:max(copies, 2)]:
            function()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for function in functions:
            function()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    del graph
    times.sort()
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]  # noqa: E731
    return pick(0.5), pick(0.2), pick(0.8)


def l2_copies(n_bytes: int, l2_bytes: int = 50 << 20) -> int:
    """Copies of a working set of ``n_bytes`` to rotate through so that the others evict each one from L2."""
    return 1 if n_bytes >= 2 * l2_bytes else -(-2 * l2_bytes // n_bytes) + 1


def measured_copy_tbps(n_bytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written (TB/s)."""
    source = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    destination = torch.empty_like(source)
    milliseconds, _, _ = bench(lambda: destination.copy_(source))
    del source, destination
    return 2 * n_bytes / (milliseconds * 1e-3) / 1e12


def measured_matmul_tflops(size: int = 8192) -> float:
    """cuBLAS bf16 matmul rate on random data (TFLOP/s)."""
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    milliseconds, _, _ = bench(lambda: a @ b)
    return 2 * size**3 / (milliseconds * 1e-3) / 1e12


def environment() -> dict[str, str]:
    import triton

    return {
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }


def write_results(name: str, rows: Sequence[dict], notes: str = "") -> Path:
    """Write rows as ``<name>.csv`` and ``<name>.md`` (with the environment on top); return the folder."""
    folder = RESULTS / gpu_slug()
    folder.mkdir(parents=True, exist_ok=True)
    env = environment()
    columns = list(rows[0].keys())
    with open(folder / f"{name}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns + list(env))
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, **env})
    lines = [f"# {name}", "", " · ".join(f"{k} {v}" for k, v in env.items()), ""]
    if notes:
        lines += [notes, ""]
    lines.append(markdown_table(rows))
    (folder / f"{name}.md").write_text("\n".join(lines) + "\n")
    return folder


def markdown_table(rows: Sequence[dict]) -> str:
    columns = list(rows[0].keys())

    def cell(value: object) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(out)


def plot(
    rows: Sequence[dict], x: str, y: str, series: str, path: Path, title: str,
    panels: str | None = None, logx: bool = True, hline: float | None = None, hline_label: str = "",
) -> None:
    """One line per value of ``series`` (y against x), optionally one panel per value of ``panels``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panel_values = sorted({row[panels] for row in rows}, key=str) if panels else [None]
    figure, axes = plt.subplots(1, len(panel_values), figsize=(5 * len(panel_values), 4), squeeze=False)
    for axis, panel in zip(axes[0], panel_values):
        subset = [row for row in rows if panels is None or row[panels] == panel]
        for label in sorted({row[series] for row in subset}, key=str):
            points = sorted((row[x], row[y]) for row in subset if row[series] == label)
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=str(label))
        if hline is not None:
            axis.axhline(hline, color="gray", linestyle="--", label=hline_label)
        if logx:
            axis.set_xscale("log", base=2)
        axis.set_xlabel(x)
        axis.set_ylabel(y)
        axis.set_title(f"{panels}={panel}" if panels else title)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle(f"{title} ({torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'})")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
