"""Pipeline schedule simulator: timelines, bubble fraction and in-flight activations, in pure Python.

Huang et al. 2019, "GPipe", arXiv:1811.06965, §2.3 (bubble O((p-1)/(m+p-1))); Narayanan et al.
2021, "Efficient Large-Scale Language Model Training on GPU Clusters Using Megatron-LM",
arXiv:2104.04473, §2.2 (Figure 3: GPipe, Figure 4: 1F1B and interleaved 1F1B). Given p stages,
m micro-batches and per-stage forward/backward times, each stage runs its operations in the
schedule's fixed order, each as early as its stage is free and its inputs exist (F of stage s needs
F of stage s-1; B of stage s needs B of stage s+1, or its own F on the last stage). From the
timeline: the bubble fraction 1 - busy / (p * makespan) and each stage's peak number of
micro-batches forwarded but not yet backwarded (the activations it must hold).

With uniform times GPipe and 1F1B both give (p-1)/(m+p-1); 1F1B holds at most p - s micro-batches
on stage s, GPipe all m. Interleaved 1F1B (v model chunks per stage, m a multiple of p) shrinks the
bubble to (p-1)/(v m + p - 1) (per-chunk times are t/v), at v times the p2p messages.

Left out: memory-limited scheduling, zero-bubble (B/W split) schedules, uneven p2p latencies.
The one idea to notice: the bubble is the same for GPipe and 1F1B; what 1F1B buys is memory.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Op", "Timeline", "stage_order", "simulate", "gpipe_bubble", "plot_timeline"]

SCHEDULES = ("gpipe", "1f1b", "interleaved")


@dataclass(frozen=True)
class Op:
    stage: int
    kind: str  # "F" or "B"
    micro_batch: int
    chunk: int
    start: float
    end: float


@dataclass
class Timeline:
    schedule: str
    p: int
    m: int
    ops: list[Op]
    makespan: float
    bubble: float  # idle share of p * makespan
    peak_in_flight: list[int]  # per stage


def gpipe_bubble(p: int, m: int, v: int = 1) -> float:
    """Bubble fraction with uniform times: (p-1)/(v*m + p-1) (v=1: GPipe and 1F1B)."""
    return (p - 1) / (v * m + p - 1)


def stage_order(schedule: str, p: int, m: int, s: int, v: int = 1) -> list[tuple[str, int, int]]:
    """The (kind, micro_batch, chunk) operations stage ``s`` runs, in order (Megatron's schedules)."""
    if schedule == "gpipe":
        return [("F", j, 0) for j in range(m)] + [("B", j, 0) for j in range(m)]
    if schedule == "1f1b":
        warmup = min(p - s - 1, m)
        order = [("F", j, 0) for j in range(warmup)]
        for j in range(m - warmup):
            order += [("F", warmup + j, 0), ("B", j, 0)]
        return order + [("B", j, 0) for j in range(m - warmup, m)]
    # interleaved: the k-th forward is chunk (k // p) % v of micro-batch (k // (p v)) p + k % p
    total = m * v
    forward = [("F", (k // (p * v)) * p + k % p, (k // p) % v) for k in range(total)]
    backward = [("B", (k // (p * v)) * p + k % p, v - 1 - (k // p) % v) for k in range(total)]
    warmup = min((p - s - 1) * 2 + (v - 1) * p, total)
    order = forward[:warmup]
    for k in range(total - warmup):
        order += [forward[warmup + k], backward[k]]
    return order + backward[total - warmup :]


def _dependency(op, p: int, v: int):
    kind, s, j, c = op
    if kind == "F":
        if s > 0:
            return ("F", s - 1, j, c)
        return ("F", p - 1, j, c - 1) if c > 0 else None
    if s < p - 1:
        return ("B", s + 1, j, c)
    return ("B", 0, j, c + 1) if c < v - 1 else ("F", p - 1, j, c)


def simulate(schedule: str, p: int, m: int, t_f=1.0, t_b=2.0, v: int = 1, t_comm: float = 0.0) -> Timeline:
    """Timeline of ``schedule`` on p stages and m micro-batches; t_f/t_b: a number or one per stage."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if not (isinstance(p, int) and isinstance(m, int) and p >= 1 and m >= 1):
        raise ValueError(f"p and m must be positive ints, got p={p!r}, m={m!r}")
    if schedule == "interleaved" and (v < 1 or m % p):
        raise ValueError(f"interleaved needs v >= 1 and m ({m}) a multiple of p ({p})")
    v = v if schedule == "interleaved" else 1
    t_f = [float(t_f)] * p if isinstance(t_f, (int, float)) else list(t_f)
    t_b = [float(t_b)] * p if isinstance(t_b, (int, float)) else list(t_b)
    if len(t_f) != p or len(t_b) != p:
        raise ValueError(f"t_f and t_b need one time per stage ({p}), got {len(t_f)} and {len(t_b)}")
    orders = [stage_order(schedule, p, m, s, v) for s in range(p)]
    done, free, cursor, ops = {}, [0.0] * p, [0] * p, []
    while any(cursor[s] < len(orders[s]) for s in range(p)):
        progress = False
        for s in range(p):
            while cursor[s] < len(orders[s]):
                kind, j, c = orders[s][cursor[s]]
                dependency = _dependency((kind, s, j, c), p, v)
                if dependency is not None and dependency not in done:
                    break
                ready = 0.0 if dependency is None else done[dependency] + (t_comm if dependency[1] != s else 0.0)
                start = max(free[s], ready)
                end = start + (t_f[s] if kind == "F" else t_b[s]) / v
                done[(kind, s, j, c)], free[s] = end, end
                ops.append(Op(s, kind, j, c, start, end))
                cursor[s] += 1
                progress = True
        if not progress:
            raise RuntimeError(f"{schedule} deadlocks with p={p}, m={m}, v={v}")
    makespan = max(op.end for op in ops)
    busy = sum(op.end - op.start for op in ops)
    peaks = []
    for s in range(p):
        alive = peak = 0
        for op in sorted((op for op in ops if op.stage == s), key=lambda op: op.start):
            alive += 1 if op.kind == "F" else -1
            peak = max(peak, alive)
        peaks.append(peak)
    return Timeline(schedule, p, m, ops, makespan, 1 - busy / (p * makespan), peaks)


def plot_timeline(timeline: Timeline, ax=None):
    """Stages as rows, forward (blue) and backward (green) boxes labelled with the micro-batch, as in the papers."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(10, 0.5 * timeline.p + 1))
    colours = {"F": "#4c72b0", "B": "#55a868"}
    for op in timeline.ops:
        shade = 1.0 - 0.35 * op.chunk / max(1, max(o.chunk for o in timeline.ops))
        ax.broken_barh([(op.start, op.end - op.start)], (op.stage - 0.4, 0.8), facecolors=colours[op.kind],
                       edgecolor="white", alpha=shade)
        ax.text((op.start + op.end) / 2, op.stage, str(op.micro_batch + 1), ha="center", va="center",
                color="white", fontsize=7)
    ax.set_ylim(timeline.p - 0.5, -0.5)
    ax.set_yticks(range(timeline.p), [f"stage {s}" for s in range(timeline.p)])
    ax.set_xlabel("time")
    ax.set_title(f"{timeline.schedule}: p={timeline.p}, m={timeline.m}, bubble {timeline.bubble:.1%}, "
                 f"peak in-flight {timeline.peak_in_flight}")
    return ax


if __name__ == "__main__":
    p, m = 4, 8
    for schedule, v in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2)):
        t = simulate(schedule, p, m, v=v)
        print(f"{schedule:12s} p={p} m={m} v={v}: bubble {t.bubble:.4f} (formula {gpipe_bubble(p, m, v):.4f}), "
              f"peak in-flight per stage {t.peak_in_flight}")
