"""Parallel scaling of a ~1B Llama-style model: TP = 1, 2, 4 (8), and PP = 2, 4 under GPipe and 1F1B.

Model (``parallel.MODELS["llama-1b"]``): hidden 2048, 16 layers, 32 heads, 8 KV heads (head dim 64),
SwiGLU intermediate 8192, vocab 32000, untied head: 1.10 B parameters, bf16, trained by
mlsys_ref.parallel's own layers (ParallelTransformer, pipeline_step), forward + backward of the
loss, no optimizer step. Every section is one spawned NCCL world (``NCCL_NVLS_ENABLE=0``):

- ``tp<t>`` (t GPUs): batch 4 x seq 2048 per step; tokens/s per GPU, and the share of the step in
  communication = the step's collectives timed alone with the same sizes and count / step time
  (our layers do not overlap communication with compute, so the two add up).
- ``pp<p>`` (p GPUs, m = 4p micro-batches of 1 x 2048): GPipe and 1F1B. CUDA events around each
  forward and backward on every stage (``pipeline_step(record=...)``) give per-micro-batch t_f, t_b
  and each stage's busy time; the measured bubble is 1 - sum(busy) / (p x step time), the idle
  fraction per stage is listed, and the alternative estimate (step - m (t_f + t_b)) / step (mean
  over stages) is next to it. ``bubble_simulated`` is schedule_sim.simulate fed the measured
  per-stage median t_f and t_b; ``bubble_formula`` is (p-1)/(m+p-1). Communication share: the p2p
  messages of the busiest stage x one message timed alone (stage 0 -> 1) / step time.

Sections run fewest GPUs first (tp1, tp2, pp2, tp4, pp4, tp8) within ``--budget-s`` (default 170 s):
each gets the time left as its deadline, and one that would start with < 30 s left is skipped.
Each section runs in try/except: a failure prints its reason and the next section runs; results
are rewritten after every section to benchmarks/results/<gpu>/parallel_scaling.{csv,md,png}
(benchmarks/parallel.py's TP=2 block results, parallel.*, are left alone).

    NCCL_NVLS_ENABLE=0 python benchmarks/parallel_scaling.py          # all GPUs, ~2-3 minutes on 4 H100
    python benchmarks/parallel_scaling.py --smoke                     # gloo on CPU, tiny model, TP 1,2 and PP 2
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ["NCCL_NVLS_ENABLE"] = "0"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402
from parallel import MODELS, _timed, collectives_ms  # noqa: E402

COLUMNS = ["section", "model", "schedule", "tp", "pp", "m", "gpus", "tokens_per_step", "ms", "ms_p20", "ms_p80",
           "tokens_per_s_per_gpu", "comm_ms", "comm_share", "t_f_ms", "t_b_ms", "bubble_measured",
           "bubble_step_minus_work", "bubble_simulated", "bubble_formula", "idle_per_stage"]


def _reference(c, device: str, dtype):
    """The reference model built on the device (meta, then filled there: a CPU randn of 1.1 B values takes long)."""
    from mlsys_ref.parallel.reference import ReferenceModel

    with torch.device("meta"):
        ref = ReferenceModel(c)
    ref = ref.to(dtype).to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:  # std 0.02 (GPT-2's): the reference's 0.1 grows the residual stream too fast at hidden 2048
                p.normal_(0.0, 1.0 if "embed" in name else 0.02, generator=generator)
    return ref


def _setup(model: str):
    import torch.distributed as dist

    from mlsys_ref.parallel.reference import ModelConfig

    c = ModelConfig(**MODELS[model])
    cuda = dist.get_backend() == "nccl"
    device, dtype = (f"cuda:{torch.cuda.current_device()}", torch.bfloat16) if cuda else ("cpu", torch.float32)
    return c, cuda, device, dtype, _reference(c, device, dtype)


def tp_worker(rank: int, world: int, model: str, batch: int, seq: int) -> dict:
    """TP = world: forward + backward of the whole model; time and the collectives' time alone."""
    from mlsys_ref.parallel.comm import STATS
    from mlsys_ref.parallel.launch import Grid, init_groups
    from mlsys_ref.parallel.tensor_parallel import ParallelTransformer

    c, cuda, device, dtype, ref = _setup(model)
    g = init_groups(Grid(tp=world))
    stage = ParallelTransformer(ref, g.tp_group)
    del ref  # the shards are copies
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, c.vocab, (batch, seq), generator=generator).to(device)
    step = lambda: stage(tokens, tokens).backward()  # noqa: E731
    STATS.reset()
    step()
    counted = {op: (STATS.calls[op], STATS.payload[op] // max(1, STATS.calls[op])) for op in STATS.calls}
    times = _timed(step, warmup=2, iterations=8, cuda=cuda)
    return {"times": times, "comm_ms": collectives_ms(counted, g.tp_group, world, dtype, device)}


class _Clock:
    """Timestamps of named points: CUDA events on the GPU, perf_counter on the CPU (smoke test)."""

    def __init__(self, cuda: bool):
        self.cuda, self.points = cuda, {}

    def mark(self, key):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.points[key] = event
        else:
            self.points[key] = time.perf_counter()

    def ms(self, a, b) -> float:
        if self.cuda:
            return self.points[a].elapsed_time(self.points[b])
        return (self.points[b] - self.points[a]) * 1e3


def pp_worker(rank: int, world: int, model: str, seq: int, steps: int) -> dict:
    """PP = world, m = 4p micro-batches of 1 x seq, GPipe and 1F1B: per-op times and step times of this stage."""
    import torch.distributed as dist

    from mlsys_ref.parallel.comm import STATS, send_recv
    from mlsys_ref.parallel.launch import Grid, init_groups
    from mlsys_ref.parallel.pipeline_parallel import pipeline_step, stage_layers
    from mlsys_ref.parallel.tensor_parallel import ParallelTransformer

    c, cuda, device, dtype, ref = _setup(model)
    p, m = world, 4 * world
    g = init_groups(Grid(pp=p))
    s = g.pp_rank
    stage = ParallelTransformer(ref, g.tp_group, stage_layers(c.layers, p, s), first=s == 0, last=s == p - 1)
    del ref
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, c.vocab, (m, seq), generator=generator).to(device)
    shape = (1, seq, c.hidden)
    out = {"stage": s}
    for schedule in ("gpipe", "1f1b"):
        runs = []
        for i in range(steps + 1):  # the first is warm-up
            clock = _Clock(cuda)
            dist.all_reduce(torch.zeros(1, device=device))  # every stage starts together (ns apart, not clock-synced)
            STATS.reset()
            clock.mark("start")
            pipeline_step(stage, g, tokens, tokens, m, schedule, shape,
                          record=lambda kind, j, edge: clock.mark((kind, j, edge)))
            clock.mark("end")
            if cuda:
                torch.cuda.synchronize()
            if i == 0:
                continue
            t_f = [clock.ms(("F", j, "start"), ("F", j, "end")) for j in range(m)]
            t_b = [clock.ms(("B", j, "start"), ("B", j, "end")) for j in range(m)]
            runs.append({"step_ms": clock.ms("start", "end"), "t_f": t_f, "t_b": t_b,
                         "busy_ms": sum(t_f) + sum(t_b), "p2p_messages": 2 * STATS.calls["p2p_send"]})
        out[schedule] = runs
    # one activation message alone, stage 0 -> stage 1 (timed on the receiver: its stream waits for the data)
    like = torch.randn(shape, dtype=dtype, device=device)
    if s in (0, 1):
        exchange = (lambda: send_recv(send=like, dst=g.pp_ranks[1])) if s == 0 else \
            (lambda: send_recv(recv_like=like, src=g.pp_ranks[0]))
        out["message_ms"] = statistics.median(_timed(exchange, warmup=3, iterations=20, cuda=cuda))
    dist.all_reduce(torch.zeros(1, device=device))  # no rank tears NCCL down while 0 and 1 still exchange
    return out


# -- the parent: sections, rows, files -----------------------------------------------------------------
def tp_rows(model: str, tp: int, batch: int, seq: int, backend: str, deadline_s: float) -> list[dict]:
    from mlsys_ref.parallel.launch import spawn

    per_rank = spawn(tp_worker, tp, (model, batch, seq), backend=backend, timeout_s=60.0, join_timeout_s=deadline_s)
    times = per_rank[0]["times"]
    median, quantiles = statistics.median(times), statistics.quantiles(times, n=5)
    comm = max(r["comm_ms"] for r in per_rank)
    return [{"section": f"tp{tp}", "model": model, "schedule": "-", "tp": tp, "pp": 1, "m": 1, "gpus": tp,
             "tokens_per_step": batch * seq, "ms": median, "ms_p20": quantiles[0], "ms_p80": quantiles[-1],
             "tokens_per_s_per_gpu": batch * seq / (median * 1e-3) / tp, "comm_ms": comm, "comm_share": comm / median}]


def pp_rows(model: str, p: int, seq: int, steps: int, backend: str, deadline_s: float) -> list[dict]:
    from mlsys_ref.parallel.launch import spawn
    from mlsys_ref.parallel.schedule_sim import gpipe_bubble, simulate

    per_rank = sorted(spawn(pp_worker, p, (model, seq, steps), backend=backend, timeout_s=60.0,
                            join_timeout_s=deadline_s), key=lambda r: r["stage"])
    m, message_ms = 4 * p, per_rank[1]["message_ms"]
    rows = []
    for schedule in ("gpipe", "1f1b"):
        step_ms = [max(r[schedule][k]["step_ms"] for r in per_rank) for k in range(steps)]  # the slowest stage ends it
        k = step_ms.index(statistics.median_low(step_ms))  # the median step, its per-op times
        step = step_ms[k]
        runs = [r[schedule][k] for r in per_rank]
        t_f = [statistics.median(run["t_f"]) for run in runs]  # per stage
        t_b = [statistics.median(run["t_b"]) for run in runs]
        idle = [1 - run["busy_ms"] / step for run in runs]
        work = [(step - m * (f + b)) / step for f, b in zip(t_f, t_b)]
        comm = max(run["p2p_messages"] for run in runs) * message_ms
        quantiles = statistics.quantiles(step_ms, n=5) if len(step_ms) > 1 else [step, step]
        rows.append({"section": f"pp{p}", "model": model, "schedule": schedule, "tp": 1, "pp": p, "m": m, "gpus": p,
                     "tokens_per_step": m * seq, "ms": step, "ms_p20": quantiles[0], "ms_p80": quantiles[-1],
                     "tokens_per_s_per_gpu": m * seq / (step * 1e-3) / p, "comm_ms": comm, "comm_share": comm / step,
                     "t_f_ms": statistics.mean(t_f), "t_b_ms": statistics.mean(t_b),
                     "bubble_measured": statistics.mean(idle), "bubble_step_minus_work": statistics.mean(work),
                     "bubble_simulated": simulate(schedule, p, m, t_f=t_f, t_b=t_b).bubble,
                     "bubble_formula": gpipe_bubble(p, m),
                     "idle_per_stage": " ".join(f"{x:.3f}" for x in idle)})
    return rows


def write(rows: list[dict], folder: Path, notes: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    env = common.environment()
    if not torch.cuda.is_available():
        env["gpu"] = "none (gloo on CPU)"
    full = [{k: row.get(k, "") for k in COLUMNS} for row in rows]
    with open(folder / "parallel_scaling.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS + list(env))
        writer.writeheader()
        writer.writerows({**row, **env} for row in full)
    text = ["# parallel_scaling", "", " · ".join(f"{k} {v}" for k, v in env.items()), "", notes, ""]
    if full:
        text.append(common.markdown_table(full))
    (folder / "parallel_scaling.md").write_text("\n".join(text) + "\n")
    _plot(rows, folder / "parallel_scaling.png")


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    tp = sorted((r["tp"], r["tokens_per_s_per_gpu"]) for r in rows if r["pp"] == 1)
    if tp:
        left.plot([x for x, _ in tp], [y for _, y in tp], marker="o", label="tensor parallel")
    for schedule, marker, colour in (("gpipe", "s", "C1"), ("1f1b", "^", "C2")):
        pp = sorted((r["pp"], r["tokens_per_s_per_gpu"]) for r in rows if r["schedule"] == schedule)
        if pp:
            left.plot([x for x, _ in pp], [y for _, y in pp], marker=marker, color=colour, label=f"pipeline {schedule} (m=4p)")
        bubbles = sorted((r["pp"], r["bubble_measured"], r["bubble_simulated"]) for r in rows if r["schedule"] == schedule)
        if bubbles:
            right.plot([b[0] for b in bubbles], [b[1] for b in bubbles], marker=marker, color=colour,
                       label=f"{schedule} measured")
            right.plot([b[0] for b in bubbles], [b[2] for b in bubbles], marker=marker, color=colour, linestyle="--",
                       mfc="none", label=f"{schedule} simulated from measured t_f, t_b")
    formula = sorted({(r["pp"], r["bubble_formula"]) for r in rows if r["pp"] > 1})
    if formula:
        right.plot([x for x, _ in formula], [y for _, y in formula], color="gray", linestyle=":", label="(p-1)/(m+p-1)")
    left.set(xlabel="GPUs (TP or PP size)", ylabel="tokens/s per GPU", title="throughput per GPU")
    right.set(xlabel="pipeline stages p", ylabel="bubble (idle fraction)", title="pipeline bubble, m = 4p")
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())  # 1, 2, 4, 8 rather than 2^k
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
    figure.suptitle(f"parallel scaling ({torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu, gloo'})")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="gloo on CPU, tiny model: TP 1,2 and PP 2 (tests the logic)")
    parser.add_argument("--tp", default=None, help="comma-separated TP sizes (default 1,2,4,8 up to the GPU count)")
    parser.add_argument("--pp", default=None, help="comma-separated PP sizes (default 2,4 up to the GPU count)")
    parser.add_argument("--budget-s", type=float, default=170.0,
                        help="seconds for all sections: each gets what is left (at least 30 s), later ones are skipped")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results/<gpu>; --smoke: a temp dir)")
    args = parser.parse_args()
    if args.smoke:
        backend, model, gpus, batch, seq, steps = "gloo", "tiny", 2, 2, 16, 2
        folder = Path(args.out or tempfile.mkdtemp(prefix="parallel_scaling_smoke_"))
    else:
        common.require_cuda("parallel_scaling.py")
        backend, model, gpus, batch, seq, steps = "nccl", "llama-1b", torch.cuda.device_count(), 4, 2048, 3
        folder = Path(args.out) if args.out else common.RESULTS / common.gpu_slug()
    tp_sizes = [int(t) for t in args.tp.split(",")] if args.tp else [t for t in (1, 2, 4, 8) if t <= gpus]
    pp_sizes = [int(p) for p in args.pp.split(",")] if args.pp else [p for p in (2, 4) if p <= gpus]
    from mlsys_ref.parallel.reference import ModelConfig

    c = ModelConfig(**MODELS[model])
    notes = (f"{model}: {MODELS[model]}, {c.parameter_count():,} parameters, "
             f"{'bf16 NCCL' if backend == 'nccl' else 'fp32 gloo (smoke test)'}; forward + backward, no optimizer step. "
             f"TP: batch {batch} x seq {seq}; comm_share = the step's collectives timed alone / step. PP: m = 4p "
             f"micro-batches of 1 x {seq}; bubble_measured = 1 - sum of CUDA-event busy time / (p x step), "
             "bubble_step_minus_work = (step - m (t_f + t_b)) / step, bubble_simulated = schedule_sim fed the "
             "measured per-stage t_f, t_b; comm_share = p2p messages of the busiest stage x one message alone / step.")
    sections = [(t, f"tp{t}", lambda t=t, d=0.0: tp_rows(model, t, batch, seq, backend, d)) for t in tp_sizes]
    sections += [(p, f"pp{p}", lambda p=p, d=0.0: pp_rows(model, p, seq, steps, backend, d)) for p in pp_sizes]
    sections.sort(key=lambda section: section[0])  # fewest GPUs first: tp1, tp2, pp2, tp4, pp4 (, tp8)
    rows, began = [], time.monotonic()
    for _, name, run in sections:
        start = time.monotonic()
        left = args.budget_s - (start - began)
        if left < 30:
            print(f"[{name}] skipped: {left:.0f}s of the {args.budget_s:.0f}s budget left", flush=True)
            continue
        try:
            new = run(d=left)
        except Exception as error:  # keep going: the next section may well work
            reason = str(error).strip().splitlines()
            print(f"[{name}] FAILED after {time.monotonic() - start:.0f}s: {type(error).__name__}: "
                  f"{' | '.join(reason[-6:]) if reason else traceback.format_exc(limit=3)}", flush=True)
            continue
        rows += new
        write(rows, folder, notes)
        for row in new:
            print(f"[{name}] {row.get('schedule', '-'):5s} {row['ms']:9.2f} ms/step, "
                  f"{row['tokens_per_s_per_gpu']:10.0f} tokens/s/GPU, comm {row['comm_share']:.1%}"
                  + (f", bubble measured {row['bubble_measured']:.3f} simulated {row['bubble_simulated']:.3f} "
                     f"formula {row['bubble_formula']:.3f}" if "bubble_measured" in row else "")
                  + f"  ({time.monotonic() - start:.0f}s)", flush=True)
    print(f"{len(rows)} rows in {time.monotonic() - began:.0f}s -> {folder}/parallel_scaling.{{csv,md,png}}")
    if rows:
        shown = [k for k in COLUMNS if k not in ("model", "ms_p20", "ms_p80", "tokens_per_step")]
        print(common.markdown_table([{k: row.get(k, "") for k in shown} for row in rows]))


if __name__ == "__main__":
    main()
