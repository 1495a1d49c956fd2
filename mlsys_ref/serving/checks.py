"""Tour rows for serving: each technique at small sizes against its reference (see mlsys_ref/tour.py).

Shared by the serving engineers: one function per row, appended to CHECKS.
"""

from __future__ import annotations

import torch

from mlsys_ref.tour import Check


def _engine_against_generate(device: torch.device) -> tuple[float, float]:
    """Greedy outputs of the continuous-batching engine (paged cache, chunked prefill, shared prefixes,
    preemption) vs each request alone through the reference generate(): the count of differing tokens."""
    from mlsys_ref.serving.engine import Engine
    from mlsys_ref.serving.generate import generate
    from mlsys_ref.serving.model import Llama, LlamaConfig
    from mlsys_ref.serving.sampling import SamplingParams

    model = Llama.random(LlamaConfig.tiny(), seed=1).to(device)
    shared = [(7 * j + 3) % 97 for j in range(11)]
    prompts = [shared + [20 + i] * (2 * i + 1) for i in range(4)] + [[5, 9, 13]]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    engine = Engine(model, num_blocks=8, block_size=8, max_num_seqs=4, max_num_batched_tokens=16)
    outputs = engine.generate(prompts, params, progress=False)
    wrong = 0
    for prompt, out in zip(prompts, outputs):
        expected = generate(model, prompt, params.max_tokens, stop_token_ids=[])
        wrong += sum(a != b for a, b in zip(out.output_ids, expected)) + abs(len(out.output_ids) - len(expected))
    leaked = engine.block_manager.stats()["used_blocks"]
    return float(wrong + leaked), 0.0


def _paged_decode_against_reference(device: torch.device) -> tuple[float, float]:
    """Split-KV paged decode (GQA 2, 2 splits) through shuffled, partly shared block tables vs gather + attention."""
    from mlsys_ref.serving.paged_attention import paged_attention_reference, paged_decode
    from mlsys_ref.testing import max_error, tolerance

    generator = torch.Generator().manual_seed(0)
    k_cache, v_cache = torch.randn(2, 16, 8, 2, 32, generator=generator).to(device)
    block_tables = torch.randperm(16, generator=generator).view(2, 8).to(device, torch.int32)
    block_tables[1, 0] = block_tables[0, 0]  # a shared prefix block
    context_lens = torch.tensor([37, 61], dtype=torch.int32, device=device)
    q = torch.randn(2, 4, 32, generator=generator).to(device)
    cu = torch.arange(3, dtype=torch.int32, device=device)
    out = paged_decode(q, k_cache, v_cache, block_tables, context_lens, num_splits=2)
    expected = paged_attention_reference(q, k_cache, v_cache, block_tables, cu, context_lens)
    return max_error(out, expected), tolerance(torch.float32).atol


def _write_kv_round_trip(device: torch.device) -> tuple[float, float]:
    """write_kv into a BlockManager's slots (with padding slot -1), then read the slots back."""
    from mlsys_ref.serving.kv_cache import BlockManager, allocate_kv_cache, write_kv
    from mlsys_ref.testing import max_error

    manager = BlockManager(num_blocks=8, block_size=4)
    manager.allocate("a", list(range(11)))
    slots = torch.tensor(manager.slot_mapping("a", 0, 11) + [-1], device=device)
    k_cache, v_cache = allocate_kv_cache(1, 8, 4, 2, 16, torch.float32, device)[0]
    k, v = torch.randn(2, 12, 2, 16, generator=torch.Generator().manual_seed(0)).to(device)
    write_kv(k_cache, v_cache, k, v, slots)
    read = lambda cache: cache.flatten(0, 1)[slots[:11]]  # noqa: E731
    others = torch.ones(8 * 4, dtype=torch.bool, device=device)
    others[slots[:11]] = False  # every other slot must still be zero: the padding token wrote nothing
    stray = float(k_cache.flatten(0, 1)[others].abs().max() + v_cache.flatten(0, 1)[others].abs().max())
    return max(max_error(read(k_cache), k[:11]), max_error(read(v_cache), v[:11]), stray), 0.0


def _model_cache_against_dense(device: torch.device) -> tuple[float, float]:
    """Tiny random Llama: chunked prefill then decode through the contiguous KV cache vs dense causal recompute."""
    from mlsys_ref.serving.generate import ContiguousKVCache
    from mlsys_ref.serving.model import Llama, LlamaConfig
    from mlsys_ref.testing import max_error, tolerance

    model = Llama.random(LlamaConfig.tiny(), seed=0).to(device)
    tokens = torch.randint(0, model.config.vocab_size, (29,), generator=torch.Generator().manual_seed(0)).to(device)
    cache = ContiguousKVCache(model.config, max_len=32, device=device)
    logits = []
    with torch.no_grad():
        for start, end in [(0, 17), (17, 24)] + [(i, i + 1) for i in range(24, 29)]:  # prefill, chunk, decode
            logits.append(model(tokens[start:end], cache.positions(end - start, device), cache.attend))
        dense = model.forward_dense(tokens[None])[0]
    return max_error(torch.cat(logits), dense), tolerance(torch.float32).atol


def _speculative_greedy_against_target(device: torch.device) -> tuple[float, float]:
    """Greedy speculative decoding (k = 2, 5; random small-model, self-draft and n-gram drafters) vs greedy
    decoding with the target alone: the count of differing tokens (fp64, so no argmax near-tie can flip)."""
    from mlsys_ref.serving.drafters import ModelDrafter, NGramDrafter
    from mlsys_ref.serving.generate import generate
    from mlsys_ref.serving.model import Llama, LlamaConfig
    from mlsys_ref.serving.speculative import speculative_generate

    target = Llama.random(LlamaConfig.tiny(), seed=0, std=0.3).to(device, torch.float64)
    small = Llama.random(LlamaConfig.tiny(num_layers=1), seed=1, std=0.3).to(device, torch.float64)
    prompt = [5, 17, 42, 3, 88, 13, 7, 5, 17, 42]
    expected = generate(target, prompt, 12, stop_token_ids=[])
    wrong = 0
    for k in (2, 5):
        for drafter in (ModelDrafter(small), ModelDrafter(target, num_layers=1), NGramDrafter(97)):
            out, _ = speculative_generate(target, drafter, prompt, 12, k=k, stop_token_ids=[])
            wrong += sum(a != b for a, b in zip(out, expected)) + abs(len(out) - len(expected))
    return float(wrong), 0.0


def _speculative_acceptance_rate(device: torch.device) -> tuple[float, float]:
    """Rejection sampling on fixed p, q tables (10⁵ draws): |measured acceptance − Σ min(p, q)|, within 5 standard errors."""
    from mlsys_ref.serving.speculative import acceptance_rate, verify

    generator = torch.Generator(device=device).manual_seed(0)
    p = torch.tensor([[0.5, 0.2, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]], device=device)
    q = torch.tensor([[0.1, 0.6, 0.2, 0.1]], device=device)
    B = 100_000
    draft = torch.multinomial(q[0], B, replacement=True, generator=generator)[:, None]
    n, _ = verify(p.expand(B, -1, -1), q.expand(B, -1, -1), draft, generator)
    alpha = float(acceptance_rate(p[0], q[0]))
    return abs(float(n.double().mean()) - alpha), 5 * (alpha * (1 - alpha) / B) ** 0.5


def _spec_engine_against_generate(device: torch.device) -> tuple[float, float]:
    """Batched speculative engine (n-gram and self-draft drafters, k = 3, 3 requests at once, paged cache,
    rollback by BlockManager.truncate) vs each request alone through greedy generate(): differing tokens
    plus leaked blocks (fp64 and the reference attention, so no argmax near-tie can flip)."""
    from mlsys_ref.serving.drafters import ModelDrafter, NGramDrafter
    from mlsys_ref.serving.generate import generate
    from mlsys_ref.serving.model import Llama, LlamaConfig
    from mlsys_ref.serving.sampling import SamplingParams
    from mlsys_ref.serving.spec_engine import SpeculativeConfig, SpeculativeEngine

    target = Llama.random(LlamaConfig.tiny(), seed=0, std=0.3).to(device, torch.float64)
    prompts = [[5, 17, 42, 3, 88, 5, 17], [9, 9, 8, 9, 9, 8, 9, 9], [60, 61, 62]]
    params = SamplingParams(max_tokens=9, ignore_eos=True)
    wrong = 0
    for drafter in (NGramDrafter(97), ModelDrafter(target, num_layers=1)):
        engine = SpeculativeEngine(target, SpeculativeConfig(drafter, k=3), num_blocks=16, block_size=4, max_num_seqs=3,
                                   attention="reference")
        for prompt, out in zip(prompts, engine.generate(prompts, params, progress=False)):
            expected = generate(target, prompt, params.max_tokens, stop_token_ids=[])
            wrong += sum(a != b for a, b in zip(out.output_ids, expected)) + abs(len(out.output_ids) - len(expected))
        wrong += engine.block_manager.stats()["used_blocks"]
    return float(wrong), 0.0


CHECKS = [
    Check("Llama forward with contiguous KV cache vs dense recompute", "Touvron et al. 2023 §2.2; Su et al. 2021 §3.4",
          _model_cache_against_dense),
    Check("continuous-batching engine (greedy) vs reference generate", "Yu et al. 2022 (Orca) §3; Agrawal et al. 2024 §4",
          _engine_against_generate),
    Check("paged decode (split-KV, GQA) vs gathered reference", "Kwon et al. 2023 (vLLM) §4.1; flash-decoding",
          _paged_decode_against_reference),
    Check("write_kv into paged slots: round trip", "Kwon et al. 2023 (vLLM) §4.2", _write_kv_round_trip),
    Check("speculative decoding (greedy) vs target-only greedy", "Leviathan et al. 2023 Alg. 1; Chen et al. 2023",
          _speculative_greedy_against_target),
    Check("speculative sampling: acceptance rate vs sum min(p, q)", "Leviathan et al. 2023 §3.1, Def. 3.1",
          _speculative_acceptance_rate),
    Check("batched speculative engine (greedy, paged rollback) vs target-only generate",
          "Leviathan et al. 2023 Alg. 1; Kwon et al. 2023 (vLLM) §4", _spec_engine_against_generate),
]
