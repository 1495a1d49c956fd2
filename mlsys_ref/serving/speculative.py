"""Speculative decoding: a cheap drafter proposes k tokens, the target checks all of them in one forward.

Leviathan, Kalman & Matias 2023, "Fast Inference from Transformers via Speculative Decoding",
arXiv:2211.17192, Algorithm 1 (and §3.1 for the expected number of tokens per step); Chen et al. 2023,
"Accelerating Large Language Model Decoding with Speculative Sampling", arXiv:2302.01318, Algorithm 2.

One step, with the target's distributions p and the drafter's q (after temperature):
1. the drafter samples x_1..x_k, x_i ~ q_i = q(· | context, x_<i);
2. the target runs ONE forward over [last context token, x_1..x_k] and gets p_1..p_{k+1};
3. for i = 1..k: draw r ~ U(0, 1); accept x_i if r < p_i(x_i) / q_i(x_i); at the first rejection
   draw the replacement from the residual norm(max(0, p_i − q_i)) and stop;
4. if all k were accepted, draw a bonus token from p_{k+1}.
Each step emits between 1 and k+1 tokens, and every emitted token is distributed exactly as the target
alone would have produced it: P(emit x) = min(p, q)(x) + (1 − Σ min(p, q)) · norm(max(0, p − q))(x) = p(x)
(Leviathan et al. Appendix A.1; worked through in notebooks/speculative_decoding.ipynb).
Greedy variant: accept x_i iff x_i = argmax p_i; the replacement/bonus is argmax p -- token for token
the target's greedy output. With acceptance rate α = E[Σ_x min(p, q)] per position (i.i.d. across
positions), the mean number of tokens per step is (1 − α^(k+1)) / (1 − α) (Leviathan et al. eq. 1).

The one idea to notice: the target's cost per step is one forward over k+1 positions, which on a
memory-bound accelerator costs about what one position costs; the rejection rule makes the saving free
in quality. The rollback is just ``truncate``: the target cache keeps the context plus the accepted
drafts, and a model drafter keeps the prefix of its cache that still agrees with the context.

Left out: batches of sequences (the engine's job, issue 9 part 3), tree drafts, top-k/top-p (they
would have to be applied to both p and q before the rule; only temperature is supported here).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mlsys_ref.serving.drafters import ModelDrafter, NGramDrafter
from mlsys_ref.serving.generate import ContiguousKVCache, sample_next
from mlsys_ref.serving.model import Llama

__all__ = ["verify", "verify_greedy", "expected_tokens_per_step", "acceptance_rate",
           "SpeculativeStats", "speculative_generate"]


def acceptance_rate(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """α = Σ_x min(p(x), q(x)): the probability that a draft x ~ q is accepted (Leviathan et al. Def. 3.1)."""
    return torch.minimum(p, q).sum(-1)


def expected_tokens_per_step(alpha: float, k: int) -> float:
    """(1 − α^(k+1)) / (1 − α): tokens emitted per target forward with i.i.d. acceptance α (eq. 1)."""
    return float(k + 1) if alpha >= 1.0 else (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def verify(p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Modified rejection sampling, batched over leading dims.

    p ``[B, k+1, V]`` target probabilities, q ``[B, k, V]`` draft probabilities, draft ``[B, k]`` tokens.
    Returns (n ``[B]`` accepted drafts, t ``[B]`` the token after them: residual sample or bonus).
    """
    if p.dim() != 3 or q.shape != (p.shape[0], p.shape[1] - 1, p.shape[2]) or draft.shape != q.shape[:2]:
        raise ValueError(f"expected p [B, k+1, V], q [B, k, V], draft [B, k]; got {tuple(p.shape)}, "
                         f"{tuple(q.shape)}, {tuple(draft.shape)}")
    B, k = draft.shape
    p_x = p[:, :k].gather(-1, draft[..., None])[..., 0]  # p_i(x_i): [B, k]
    q_x = q.gather(-1, draft[..., None])[..., 0]  # q_i(x_i): [B, k]
    r = torch.rand(B, k, generator=generator, device=p.device, dtype=p.dtype)
    accepted = r * q_x < p_x  # r < p/q, without dividing (q_x > 0 since x_i ~ q_i)
    n = accepted.long().cumprod(-1).sum(-1)  # length of the accepted prefix: [B]

    # q padded with a zero row at position k+1: there the "residual" max(0, p − 0) is p, the bonus
    q_padded = torch.cat([q, torch.zeros_like(p[:, :1])], dim=1)  # [B, k+1, V]
    rows = torch.arange(B, device=p.device)
    residual = (p[rows, n] - q_padded[rows, n]).clamp_min(0)  # max(0, p_n − q_n): [B, V]
    mass = residual.sum(-1, keepdim=True)
    # mass 0 means p_n == q_n, where a rejection has probability 0 -- only rounding gets here; use p_n
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), p[rows, n])
    t = torch.multinomial(residual, 1, generator=generator)[:, 0]
    return n, t


def verify_greedy(target_logits: torch.Tensor, draft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy variant: logits ``[B, k+1, V]``, draft ``[B, k]`` -> (n accepted, t = argmax after them)."""
    best = target_logits.argmax(-1)  # [B, k+1]
    n = (draft == best[:, :-1]).long().cumprod(-1).sum(-1)
    return n, best.gather(1, n[:, None])[:, 0]


@dataclass
class SpeculativeStats:
    steps: int = 0  # target forwards after the prefill
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0
    histogram: list[int] = field(default_factory=list)  # histogram[n] = steps that accepted n drafts

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.drafted, 1)

    @property
    def tokens_per_step(self) -> float:
        return self.emitted / max(self.steps, 1)


@torch.no_grad()
def speculative_generate(
    target: Llama,
    drafter: ModelDrafter | NGramDrafter,
    prompt_ids: list[int],
    max_tokens: int,
    k: int = 4,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    stop_token_ids: list[int] | None = None,
    verbose: bool = False,
) -> tuple[list[int], SpeculativeStats]:
    """Generate like ``generate(target, ...)`` -- same tokens when greedy, same distribution when sampling."""
    config = target.config
    if not isinstance(prompt_ids, (list, tuple)) or not prompt_ids:
        raise ValueError("prompt_ids must be a non-empty list of token ids")
    if any(not isinstance(t, int) or not 0 <= t < config.vocab_size for t in prompt_ids):
        raise ValueError(f"prompt_ids must be ints in [0, {config.vocab_size})")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if not isinstance(max_tokens, int) or max_tokens < 0:
        raise ValueError(f"max_tokens must be a non-negative int, got {max_tokens!r}")
    if len(prompt_ids) + max_tokens > config.max_position_embeddings:
        raise ValueError(f"prompt + max_tokens exceeds the context ({config.max_position_embeddings})")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if getattr(drafter, "vocab_size", config.vocab_size) != config.vocab_size:
        raise ValueError(f"drafter vocab {drafter.vocab_size} != target vocab {config.vocab_size}")
    stops = set([] if config.eos_token_id is None else [config.eos_token_id]) if stop_token_ids is None \
        else set(stop_token_ids)
    device = target.embed_tokens.weight.device
    weight = target.embed_tokens.weight
    cache = ContiguousKVCache(config, len(prompt_ids) + max_tokens + k + 1, weight.dtype, device)

    context, output, stats = list(prompt_ids), [], SpeculativeStats(histogram=[0] * (k + 1))
    if len(context) > 1:  # invariant: the target cache holds every context token but the last
        target(torch.tensor(context[:-1], device=device), cache.positions(len(context) - 1, device), cache.attend,
               torch.empty(0, dtype=torch.long, device=device))
    while len(output) < max_tokens:
        budget = min(k, max_tokens - len(output) - 1)  # never draft past max_tokens
        draft, q = drafter.propose(context, budget, temperature, generator) if budget else ([], None)
        # -- one target forward over the last context token and the drafts: p_1 .. p_{len(draft)+1}
        step = torch.tensor(context[-1:] + draft, device=device)
        logits = target(step, cache.positions(len(step), device), cache.attend)  # [k'+1, V]
        x = torch.tensor([draft], dtype=torch.long, device=device)
        if temperature == 0.0:
            n, t = verify_greedy(logits[None], x)
        elif draft:
            p = torch.softmax(logits / temperature, dim=-1)
            n, t = verify(p[None], q[None].to(p), x, generator)
        else:  # nothing drafted: an ordinary decoding step
            n, t = torch.zeros(1, dtype=torch.long), torch.tensor([sample_next(logits[0], temperature, generator)])
        n, t = int(n[0]), int(t[0])
        new = draft[:n] + [t]
        cache.truncate(len(context) + n)  # rollback: keep context + accepted drafts (t is fed next step)
        stats.steps += 1
        stats.drafted += len(draft)
        stats.accepted += n
        stats.histogram[n] += 1
        if verbose:
            print(f"step {stats.steps}: drafted {draft}, accepted {n}, emitted {new}")
        for token in new:
            output.append(token)
            context.append(token)
            stats.emitted += 1
            if token in stops or len(output) == max_tokens:
                return output, stats
    return output, stats


if __name__ == "__main__":
    from mlsys_ref.serving.generate import generate
    from mlsys_ref.serving.model import LlamaConfig

    config = LlamaConfig.tiny()
    target, small = Llama.random(config, seed=0, std=0.3), Llama.random(LlamaConfig.tiny(num_layers=1), seed=1, std=0.3)
    prompt = [5, 17, 42, 3, 88, 13, 7]
    expected = generate(target, prompt, 40, stop_token_ids=[])
    close = Llama.random(config, seed=0, std=0.3)  # the target plus a little noise: a drafter that usually agrees
    with torch.no_grad():
        for parameter in close.parameters():
            parameter.add_(0.01 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(5)))
    for name, drafter in [("random small model", ModelDrafter(small)), ("noisy copy of the target", ModelDrafter(close)),
                          ("self-draft (1 of 2 layers)", ModelDrafter(target, 1)),
                          ("n-gram lookup", NGramDrafter(config.vocab_size))]:
        out, stats = speculative_generate(target, drafter, prompt, 40, k=4, stop_token_ids=[])
        print(f"{name:28s} greedy identical: {out == expected}  acceptance {stats.acceptance_rate:.2f}  "
              f"tokens/step {stats.tokens_per_step:.2f}  histogram {stats.histogram}")
