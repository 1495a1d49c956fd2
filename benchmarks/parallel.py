"""Parallelism benchmark: simulated pipeline schedules (anywhere) and TP=2 block throughput (>= 2 GPUs).

CPU part: GPipe, 1F1B and interleaved 1F1B from mlsys_ref.parallel.schedule_sim for p in {2, 4, 8}
and m in {1 .. 64}: bubble fraction (and the closed form) and peak in-flight micro-batches;
written to benchmarks/results/cpu/parallel.{csv,md,png}.

GPU part (>= 2 CUDA devices, skipped otherwise or with --cpu-only): forward + backward of one
tensor-parallel Llama block (mlsys_ref.parallel.tensor_parallel.TPBlock, bf16) on TP = 1 and TP = 2
(or --tp 2,4,8), tokens/s and speed-up, and the share of the step spent in communication,
estimated as (the block's collectives, timed alone with the same sizes and count) / (step time):
our layers do not overlap communication with compute, so the two add up. ``--model llama-1b``
times the whole 16-layer ~1B Llama-style model (vocab-parallel loss included) instead of one block.
Written to benchmarks/results/<gpu>/parallel.{csv,md,png}. NCCL_NVLS_ENABLE=0 is set for every rank.

    python benchmarks/parallel.py                 # simulator table, then TP=2 on 2 GPUs (~3 min)
    python benchmarks/parallel.py --cpu-only      # simulator only
    python benchmarks/parallel.py --tp 2,4,8 --model llama-1b

Scaling of the ~1B model over TP = 1, 2, 4 (8) and PP = 2, 4 (GPipe and 1F1B, measured against the
simulated bubble) is benchmarks/parallel_scaling.py, which imports MODELS and the timers from here.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from pathlib import Path

os.environ["NCCL_NVLS_ENABLE"] = "0"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402
from mlsys_ref.parallel.schedule_sim import gpipe_bubble, simulate  # noqa: E402

MODELS = {  # one block of a 7B-class width, and issue 11's ~1B Llama-style model
    "block": dict(vocab=128, hidden=4096, heads=32, kv_heads=8, ffn=14336, layers=1),
    "llama-1b": dict(vocab=32000, hidden=2048, heads=32, kv_heads=8, ffn=8192, layers=16),
    "tiny": dict(vocab=96, hidden=64, heads=8, kv_heads=4, ffn=96, layers=4),  # smoke tests of the scripts on CPU
}


def simulator_rows() -> list[dict]:
    rows = []
    for p in (2, 4, 8):
        for m in (1, 2, 4, 8, 16, 32, 64):
            for schedule, v in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2)):
                if schedule == "interleaved" and m % p:
                    continue
                t = simulate(schedule, p, m, t_f=1.0, t_b=2.0, v=v)
                rows.append({"schedule": schedule if v == 1 else f"{schedule} v={v}", "p": p, "m": m,
                             "bubble": t.bubble, "formula": gpipe_bubble(p, m, v),
                             "peak_in_flight": max(t.peak_in_flight)})
    return rows


def write_cpu(rows: list[dict]) -> Path:
    folder = common.RESULTS / "cpu"
    folder.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in common.environment().items() if k != "gpu"}
    with open(folder / "parallel.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) + list(env))
        writer.writeheader()
        writer.writerows({**row, **env} for row in rows)
    notes = ("Simulated pipeline schedules, uniform times t_f = 1, t_b = 2 (per micro-batch; interleaved "
             "chunks take 1/v). Bubble = idle share of p x makespan; formula (p-1)/(v m + p-1). "
             "peak_in_flight = the most micro-batches (chunks, for interleaved) any stage holds.")
    text = ["# parallel (schedule simulator)", "", " · ".join(f"{k} {v}" for k, v in env.items()), "", notes, "",
            common.markdown_table(rows)]
    (folder / "parallel.md").write_text("\n".join(text) + "\n")
    common.plot(rows, x="m", y="bubble", series="schedule", panels="p", path=folder / "parallel.png",
                title="pipeline bubble vs micro-batches")
    return folder


# -- GPU: tensor-parallel block throughput ------------------------------------------------------------
def _timed(function, warmup: int, iterations: int, cuda: bool = True) -> list[float]:
    """Milliseconds of each of ``iterations`` calls (fixed count: every rank must run the same collectives)."""
    for _ in range(warmup):
        function()
    if not cuda:  # the gloo smoke test (--model tiny on CPU)
        times = []
        for _ in range(iterations):
            start = time.perf_counter()
            function()
            times.append((time.perf_counter() - start) * 1e3)
        return times
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iterations)]
    torch.cuda.synchronize()
    for start, end in events:
        start.record()
        function()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def collectives_ms(counted: dict, group, tp: int, dtype, device) -> float:
    """Milliseconds of a step's TP collectives ({op: (calls, bytes per call)}) timed alone, same sizes and count.

    The cross-entropy's [tokens] all-reduces and the SP norm-gradient all-reduce are left out (tiny).
    """
    from mlsys_ref.parallel.comm import all_gather, all_reduce, reduce_scatter

    total = 0.0
    for op, (calls, nbytes) in counted.items():
        if calls == 0 or op.startswith("ce") or op.startswith("sp_grad") or op.startswith("p2p"):
            continue
        buffer = torch.empty(nbytes // dtype.itemsize, dtype=dtype, device=device)
        if op == "all_reduce":
            run = lambda: all_reduce(buffer, group)  # noqa: E731
        elif op == "all_gather":
            part = buffer[: buffer.numel() // tp]
            run = lambda: all_gather(part, 0, group)  # noqa: E731
        else:
            run = lambda: reduce_scatter(buffer, 0, group)  # noqa: E731
        on_gpu = torch.device(device).type == "cuda"
        total += calls * statistics.median(_timed(run, warmup=2, iterations=10, cuda=on_gpu))
    return total


def tp_worker(rank: int, world_size: int, model: str, tp_sizes: list[int], batch: int, seq: int, sp: bool) -> list[dict]:
    import torch.distributed as dist

    from mlsys_ref.parallel.comm import STATS
    from mlsys_ref.parallel.reference import ModelConfig, ReferenceModel
    from mlsys_ref.parallel.tensor_parallel import ParallelTransformer, TPBlock

    c = ModelConfig(**MODELS[model])
    device, dtype = ("cuda", torch.bfloat16) if dist.get_backend() == "nccl" else ("cpu", torch.float32)
    ref = ReferenceModel(c).to(device, dtype)
    tokens = torch.randint(0, c.vocab, (batch, seq), device=device)
    rows = []
    for tp in [1] + tp_sizes:
        ranks = list(range(tp)) if tp > 1 else [rank]
        group = None
        for members in ([[r] for r in range(world_size)] if tp == 1 else [list(range(tp))]):
            created = dist.new_group(members)
            group = created if rank in members else group
        if rank >= tp and tp > 1:  # ranks outside this TP group wait
            dist.barrier()
            continue
        if model == "block":
            module = TPBlock(ref, 0, group, sequence_parallel=sp and tp > 1)
            x = torch.randn(batch, seq // tp if sp and tp > 1 else seq, c.hidden, device=device, dtype=dtype,
                            requires_grad=True)
            step = lambda: module(x).sum().backward()  # noqa: E731
        else:
            module = ParallelTransformer(ref, group, sequence_parallel=sp and tp > 1)
            step = lambda: module(tokens, tokens).backward()  # noqa: E731
        STATS.reset()
        step()  # one step to count the collectives
        counted = {op: (STATS.calls[op], STATS.payload[op] // max(1, STATS.calls[op])) for op in STATS.calls}
        times = _timed(step, warmup=3, iterations=10, cuda=device == "cuda")
        comm_ms = collectives_ms(counted, group, tp, dtype, device)
        median = statistics.median(times)
        quantiles = statistics.quantiles(times, n=5)
        rows.append({"model": model, "tp": tp, "sequence_parallel": sp and tp > 1, "tokens": batch * seq,
                     "ms": median, "ms_p20": quantiles[0], "ms_p80": quantiles[-1],
                     "tokens_per_s": batch * seq / (median * 1e-3), "comm_ms": comm_ms,
                     "comm_share": comm_ms / median})
        del module
        if device == "cuda":
            torch.cuda.empty_cache()
        if tp > 1 and world_size > tp:
            dist.barrier()
    return rows


def gpu_rows(model: str, tp_sizes: list[int], batch: int, seq: int, sp: bool, backend: str = "nccl") -> list[dict]:
    from mlsys_ref.parallel.launch import spawn

    world = max(tp_sizes)
    per_rank = spawn(tp_worker, world, (model, tp_sizes, batch, seq, sp), backend=backend, timeout_s=300.0,
                     join_timeout_s=900.0)
    rows = per_rank[0]
    single = next(row["tokens_per_s"] for row in rows if row["tp"] == 1)
    for row in rows:
        row["speedup_vs_1gpu"] = row["tokens_per_s"] / single
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-only", action="store_true", help="simulated schedules only")
    parser.add_argument("--tp", default="2", help="comma-separated TP sizes to time against 1 GPU (default 2)")
    parser.add_argument("--model", choices=sorted(MODELS), default="block")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--sequence-parallel", action="store_true")
    args = parser.parse_args()
    rows = simulator_rows()
    folder = write_cpu(rows)
    print(common.markdown_table([r for r in rows if r["p"] == 4]))
    print(f"simulator results in {folder}")
    if args.cpu_only:
        return
    tp_sizes = sorted({int(t) for t in args.tp.split(",")})
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if available < 2:
        print(f"GPU part skipped: needs >= 2 CUDA devices, found {available}")
        return
    kept = [t for t in tp_sizes if t <= available]
    if kept != tp_sizes:
        print(f"skipping TP sizes {sorted(set(tp_sizes) - set(kept))}: only {available} GPUs")
    rows = gpu_rows(args.model, kept, args.batch, args.seq, args.sequence_parallel)
    notes = (f"Forward + backward of {args.model} ({MODELS[args.model]}), bf16, batch {args.batch} x seq {args.seq}; "
             "comm_ms = the step's collectives timed alone (same sizes and count); no overlap in these layers.")
    folder = common.write_results("parallel", rows, notes)
    common.plot(rows, x="tp", y="tokens_per_s", series="model", path=folder / "parallel.png",
                title="tensor-parallel throughput")
    print(common.markdown_table(rows))
    print(f"GPU results in {folder}")


if __name__ == "__main__":
    main()
