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


CHECKS = [
    Check("continuous-batching engine (greedy) vs reference generate", "Yu et al. 2022 (Orca) §3; Agrawal et al. 2024 §4",
          _engine_against_generate),
]
