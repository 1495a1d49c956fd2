"""Helpers of ``benchmarks/serving.py``: the workload, the per-step time split, the host-only profile, the
greedy check against the reference, and transformers' side (our weights in a ``LlamaForCausalLM``; its
``generate`` eager and compiled). Kept apart so that the benchmark itself reads as its sections."""

from __future__ import annotations

import math
import os
import random
import time
import traceback

import torch

from mlsys_ref.serving.engine import Engine
from mlsys_ref.serving.model import Llama, LlamaConfig
from mlsys_ref.serving.sampling import SamplingParams


def make_workload(n: int, vocab: int, prompt_median: int, output_median: int, cap: int, sigma: float = 1.0,
                  seed: int = 0):
    """ShareGPT-like lengths (the vLLM paper's Fig. 11: long-tailed, mean prompt ~160, mean output ~340 tokens):
    prompt and output lengths log-normal with the given medians and ``sigma`` (log space), clipped to [4, cap];
    random token ids. Seeded: every system sees the same requests in the same arrival order."""
    rng = random.Random(seed)

    def draw(median):
        return min(cap, max(4, int(rng.lognormvariate(math.log(median), sigma))))

    lengths = [draw(prompt_median) for _ in range(n)]
    outputs = [draw(output_median) for _ in range(n)]
    prompts = [[rng.randrange(10, vocab) for _ in range(length)] for length in lengths]
    return prompts, outputs


class StepProfile:
    """Per-step time split, by kind of step (pure decode / with prefill): host time in the scheduler, the
    forward's launch (``execute`` returns before the GPU is done), sampling (waits for the GPU: its one sync),
    the scheduler's postprocess, and the forward's GPU time (CUDA events). Wraps the engine's parts in place."""

    PARTS = ("step", "schedule", "execute", "sample", "postprocess", "gpu")

    def __init__(self, engine: Engine):
        import mlsys_ref.serving.engine as engine_module

        self.engine, self.module, self.kind = engine, engine_module, "decode"
        self.current = dict.fromkeys(self.PARTS, 0.0)
        self.totals: dict[str, dict[str, float]] = {}
        self.events: list[tuple[str, object, object]] = []
        self.cuda = engine.device.type == "cuda"
        sched, runner = engine.scheduler, engine.runner
        self._saved = (sched.schedule, sched.postprocess, runner.execute, engine_module.sample, engine.step)
        schedule, postprocess, execute, sample, step = self._saved

        def timed(name, function):
            def wrapper(*args, **kwargs):
                start = time.perf_counter()
                result = function(*args, **kwargs)
                self._add(name, time.perf_counter() - start)
                return result
            return wrapper

        def timed_execute(chunks, block_manager):
            self.kind = "decode" if all(c.end - c.start == 1 for c in chunks) else "prefill/mixed"
            if self.cuda:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
            start = time.perf_counter()
            result = execute(chunks, block_manager)
            self._add("execute", time.perf_counter() - start)
            if self.cuda:
                end.record()
                self.events.append((self.kind, begin, end))
            return result

        def timed_step():
            self.kind, self.current = "no forward", dict.fromkeys(self.PARTS, 0.0)
            start = time.perf_counter()
            result = step()
            self.current["step"] = time.perf_counter() - start
            bucket = self.totals.setdefault(self.kind, dict.fromkeys(self.PARTS + ("steps",), 0.0))
            for name, seconds in self.current.items():
                bucket[name] += seconds
            bucket["steps"] += 1
            return result

        sched.schedule, sched.postprocess = timed("schedule", schedule), timed("postprocess", postprocess)
        runner.execute, engine_module.sample, engine.step = timed_execute, timed("sample", sample), timed_step

    def _add(self, name: str, seconds: float) -> None:
        self.current[name] += seconds

    def close(self) -> str:
        """Restore the engine and return a table: ms per step of each part, by kind of step."""
        sched, runner = self.engine.scheduler, self.engine.runner
        sched.schedule, sched.postprocess, runner.execute, self.module.sample, self.engine.step = self._saved
        del self.engine.step  # the instance attribute; the class method is back
        if self.cuda:
            torch.cuda.synchronize()
            for kind, begin, end in self.events:  # the forward's GPU time (graph replay or eager kernels)
                self.totals[kind]["gpu"] += begin.elapsed_time(end) / 1e3
        lines = [f"      {'kind':14s} {'steps':>6s} " + " ".join(f"{p + ' ms':>14s}" for p in self.PARTS)]
        for kind, bucket in self.totals.items():
            steps = max(bucket["steps"], 1)
            lines.append(f"      {kind:14s} {int(bucket['steps']):6d} "
                         + " ".join(f"{1e3 * bucket[p] / steps:14.3f}" for p in self.PARTS))
        return "\n".join(lines)


def check_against_reference(model, prompts, results, k: int = 2, n: int = 16) -> None:
    """Greedy tokens of the first k requests vs the contiguous-cache reference generate(). In bf16 with random
    weights near-ties flip tokens, so at a first difference this prints how far apart the two choices are in the
    reference's logits (a gap of a few bf16 ulps is a tie, not a bug); the fp32 GPU tests assert identity."""
    from mlsys_ref.serving.generate import generate

    for prompt, result in zip(prompts[:k], results[:k]):
        ours = result.output_ids[:n]
        expected = generate(model, prompt, len(ours), stop_token_ids=[])
        i = next((i for i, (x, y) in enumerate(zip(ours, expected)) if x != y), None)
        if i is None:
            print(f"   check: {len(ours)}/{len(ours)} tokens equal to reference generate()")
            continue
        with torch.no_grad():
            logits = model.forward_dense(torch.tensor([prompt + ours[:i]], device=model.embed_tokens.weight.device))[0, -1].float()
        print(f"   check: first {i}/{len(ours)} tokens equal to reference generate(); then logits of the two choices "
              f"{logits[expected[i]]:.3f} vs {logits[ours[i]]:.3f} (top logit {logits.max():.3f}, std {logits.std():.3f})")


def host_profile(graph_sizes, batch_sizes=(64, 128, 256), steps: int = 400) -> None:
    """The engine's host time per step, without the GPU: on the CPU, a tiny model whose forward is replaced by a
    fixed logits tensor (vocab 1024), the graph paths emulated (same buffers, block-table rows, padding), one
    thread. Each batch size gets 2x as many requests (prompts 20..300, outputs 300..900 tokens); the split is
    ``StepProfile``'s (schedule / inputs + launch / sample / postprocess)."""
    import mlsys_ref.serving.cuda_graphs as cuda_graphs
    import mlsys_ref.serving.model_runner as model_runner

    logits = torch.randn(4096, 1024)

    def no_forward(model, tokens, positions, attend, before=None, after=None, logits_indices=None):
        return logits[:tokens.shape[0] if logits_indices is None else logits_indices.shape[0]]

    saved = model_runner.forward_unchecked, torch.get_num_threads()
    model_runner.forward_unchecked = cuda_graphs.forward_unchecked = no_forward  # the module globals the paths call
    torch.set_num_threads(1)
    try:
        model = Llama.random(LlamaConfig.tiny(vocab_size=1024, max_position_embeddings=2048))
        for b in batch_sizes:
            rng = random.Random(0)
            engine = Engine(model, num_blocks=b * 70 + 64, block_size=16, max_num_seqs=b, max_num_batched_tokens=2048,
                            max_model_len=1216)
            engine.runner.capture_decode_graphs([s for s in graph_sizes if s <= b], 76, emulate=True)
            engine.runner.capture_mixed_graphs([64, 256, 1024, 2048], b, 76, emulate=True)
            for _ in range(2 * b):
                engine.add_request([rng.randrange(10, 1024) for _ in range(rng.randrange(20, 300))],
                                   SamplingParams(max_tokens=rng.randrange(300, 900), ignore_eos=True))
            for _ in range(20):
                engine.step()
            profile = StepProfile(engine)
            for _ in range(steps):
                engine.step()
            print(f"   host time per step, up to {b} running sequences (CPU, no forward):\n" + profile.close())
    finally:
        model_runner.forward_unchecked = cuda_graphs.forward_unchecked = saved[0]
        torch.set_num_threads(saved[1])


def to_transformers(model: Llama):
    """A transformers LlamaForCausalLM with our weights (same rotary layout: 'rotate half')."""
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    c = model.config
    hf = LlamaForCausalLM(HFConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim, rope_theta=c.rope_theta, rms_norm_eps=c.rms_norm_eps, rope_scaling=c.rope_scaling,
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_embeddings,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id))
    state = {}
    for name, tensor in model.state_dict().items():
        name = name.replace("attention.", "self_attn.").replace("attn_norm", "input_layernorm")
        name = name.replace("mlp_norm", "post_attention_layernorm")
        state[name if name == "lm_head.weight" else f"model.{name}"] = tensor
    hf.load_state_dict(state, strict=True)
    return hf


def load_transformers(model: Llama, args):
    if args.gguf:
        try:
            from transformers import AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(args.gguf), gguf_file=os.path.basename(args.gguf))
            print("   transformers model loaded from the same GGUF (gguf_file=)")
            return hf.to(model.embed_tokens.weight.dtype).to(args.device).eval()
        except Exception as error:
            print(f"   transformers could not load the GGUF ({type(error).__name__}: {error}); copying our weights instead")
    return to_transformers(model).to(model.embed_tokens.weight.dtype).to(args.device).eval()


def hf_generate(hf, batch_prompts, max_new, device, **kwargs):
    longest = max(len(p) for p in batch_prompts)
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in batch_prompts], device=device)
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in batch_prompts], device=device)
    with torch.no_grad():
        return hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new,
                           do_sample=False, pad_token_id=0, **kwargs)


def bench_transformers(model, args, prompts, outputs, add_row, sync):
    """transformers' generate on our weights: batch 32 eager, batch 1 eager and compiled (rows via ``add_row``)."""
    import transformers

    print(f"   transformers {transformers.__version__}, torch {torch.__version__}")
    hf = load_transformers(model, args)
    hf.generation_config.eos_token_id = None  # ignore_eos, like every other system here
    prompt, n = [list(range(10, 42))], args.decode_tokens
    with torch.no_grad():
        ids = torch.tensor(prompt, device=args.device)
        ours, theirs = model.forward_dense(ids)[0].float(), hf(input_ids=ids).logits[0].float()
    print(f"   same model? prompt logits, transformers vs ours: max |diff| {(ours - theirs).abs().max():.3f}, "
          f"logit std {ours.std():.3f}")

    def time_hf(batch_prompts, label, new_tokens, **kwargs):
        for _ in range(2 if kwargs else 1):  # warm-up (compiles) with the measured shapes: another cache length
            hf_generate(hf, batch_prompts, new_tokens if kwargs else 4, args.device, **kwargs)  # would recompile
        sync(args.device)
        start = time.perf_counter()
        hf_generate(hf, batch_prompts, new_tokens, args.device, **kwargs)
        sync(args.device)
        b = len(batch_prompts)
        add_row(f"transformers batch-{b} ({label})", str(b), b, b * new_tokens, time.perf_counter() - start,
                notes=("32-token prompt" if b == 1 else f"the workload's first {b} prompts, padded")
                + f", {new_tokens} new tokens each, end to end")

    def time_batch1(label, **kwargs):
        time_hf(prompt, label, n, **kwargs)

    b, new = args.hf_batch, args.hf_new_tokens
    time_hf(prompts[:b], "eager", new)
    time_batch1("eager")
    if args.skip_hf_compile:
        print("   transformers compiled static cache: skipped (--skip-hf-compile)")
        return
    # The documented way (transformers >= 4.48): a static cache makes generate() torch.compile the forward itself
    # (generation_config.compile_config, mode "reduce-overhead" = CUDA graphs). Compiling hf.forward by hand on top
    # of that compiles twice and trips cudagraph trees' "overwritten output" check, hence the fallback order.
    attempts = [("static cache, generate compiles", dict(cache_implementation="static"))]
    if hasattr(transformers, "CompileConfig"):
        attempts.append(("static cache, CompileConfig(fullgraph)", dict(
            cache_implementation="static", compile_config=transformers.CompileConfig(fullgraph=True, mode="reduce-overhead"))))
    for label, kwargs in attempts:
        if time.perf_counter() > args.deadline - 45:
            print(f"   transformers batch-1 ({label}): skipped, too little time left")
            return
        try:
            time_batch1(label, **kwargs)
            if args.hf_compiled_batch and time.perf_counter() < args.deadline - 60:  # the same recipe at batch 32
                time_hf(prompts[:b], label, new, **kwargs)
            return  # one compiled recipe is enough
        except Exception as error:
            print(f"   transformers batch-1 ({label}) FAILED: {type(error).__name__}: {str(error)[:400]}")
            traceback.print_exc(limit=3)
        torch._dynamo.reset()
    if time.perf_counter() > args.deadline - 45:
        return
    eager_forward = hf.forward
    try:  # the older recipe: compile the forward by hand, generate's own compilation off
        hf.forward = torch.compile(hf.forward, mode="reduce-overhead", fullgraph=True)
        extra = {"disable_compile": True} if "disable_compile" in transformers.GenerationConfig().to_dict() else {}
        time_batch1("static cache, forward compiled by hand", cache_implementation="static", **extra)
    except Exception as error:
        print(f"   transformers batch-1 (forward compiled by hand) FAILED: {type(error).__name__}: {str(error)[:400]}")
        traceback.print_exc(limit=3)
    finally:
        hf.forward = eager_forward
