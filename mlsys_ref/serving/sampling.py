"""Sampling parameters and per-request sampling: greedy, temperature, top-k, top-p, seeds, stops.

Papers: temperature sampling (Ackley, Hinton & Sejnowski 1985); top-k (Fan, Lewis & Dauphin 2018,
arXiv 1805.04833, §5.4); nucleus / top-p (Holtzman et al. 2020, arXiv 1904.09751, §3.1).
The batched form follows vLLM's sampler (Kwon et al. 2023, arXiv 2309.06180): one row of logits per
sequence, every row with its own parameters.

The one idea to notice: **each request owns its random stream**. A sampled token is drawn with
that request's ``torch.Generator`` (seeded from ``SamplingParams.seed``), and the generator only
advances when that request samples. So a seeded request produces the same tokens whether it runs
alone or next to 200 others, and a request preempted and recomputed resumes its stream exactly.
(The filtering by temperature, top-k and top-p is row-wise, so batching it cannot mix rows either.)

Left out: logprobs, repetition/presence/frequency penalties, min-p, beam search, logit bias,
and stop *strings* (stops are token ids).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = ["SamplingParams", "sample", "make_generator"]


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens.

    temperature: 0 means greedy (argmax); > 0 divides the logits before the softmax.
    top_k: keep the k most likely tokens (0 = no limit). top_p: keep the smallest set of tokens
    whose probability sums to at least p (1.0 = no limit). seed: the request's random stream
    (None = drawn from torch's global generator when the request arrives).
    max_tokens: the most tokens to generate. stop_token_ids: generation ends after one of these
    (it is included in the output). ignore_eos: do not stop at the model's end-of-sequence token.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 16
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
            raise TypeError(f"temperature must be a number, got {type(self.temperature).__name__}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = no limit), got {self.top_k!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"seed must be None or an int >= 0, got {self.seed!r}")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        stops = tuple(self.stop_token_ids)
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in stops):
            raise ValueError(f"stop_token_ids must be ints >= 0, got {self.stop_token_ids!r}")
        object.__setattr__(self, "stop_token_ids", stops)  # lists are accepted, stored as a tuple

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def make_generator(params: SamplingParams, device: torch.device | str) -> torch.Generator | None:
    """The request's own random stream (None for greedy requests, which never draw)."""
    if params.greedy:
        return None
    generator = torch.Generator(device=torch.device(device))
    seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
    generator.manual_seed(seed)
    return generator


def _filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set the logits outside each row's top-k and top-p sets to -inf (row-wise, so rows never mix)."""
    # logits: [B, V]; top_k: [B] int64 (0 = off); top_p: [B] float (1 = off)
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [B, V]
    rank = torch.arange(vocab, device=logits.device).expand_as(sorted_logits)
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab)).clamp(max=vocab)
    drop = rank >= k[:, None]
    # -- top-p: drop a token when the mass strictly before it already reaches p (so the top one stays)
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= mass_before >= top_p[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    """One token per row of ``logits`` [B, vocab], each row with its own params and generator."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    if len(params) != logits.shape[0] or len(generators) != logits.shape[0]:
        raise ValueError(
            f"need one SamplingParams and one generator per row: {logits.shape[0]} rows, "
            f"{len(params)} params, {len(generators)} generators"
        )
    logits = logits.float()
    tokens = logits.argmax(dim=-1)  # [B]; the greedy rows' answer, and overwritten for sampled rows
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        index = torch.tensor(rows, device=logits.device)
        temperature = torch.tensor([params[i].temperature for i in rows], device=logits.device)
        top_k = torch.tensor([params[i].top_k for i in rows], device=logits.device, dtype=torch.int64)
        top_p = torch.tensor([params[i].top_p for i in rows], device=logits.device)
        scaled = logits[index] / temperature[:, None]
        probs = _filter_top_k_top_p(scaled, top_k, top_p).softmax(dim=-1)  # [R, V]
        for row, i in enumerate(rows):
            if generators[i] is None:
                raise ValueError(f"row {i} samples (temperature {params[i].temperature}) but has no generator")
            # Exponential race (Gumbel-max in disguise): argmax p / E with E ~ Exp(1) samples from p,
            # drawing exactly V numbers from this request's own stream.
            race = torch.empty_like(probs[row]).exponential_(generator=generators[i])
            tokens[i] = (probs[row] / race).argmax()
    return tokens.tolist()


if __name__ == "__main__":
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    params = [SamplingParams(), SamplingParams(temperature=0.8, top_k=5, seed=1), SamplingParams(temperature=1.0, top_p=0.5, seed=2)]
    alone = sample(logits[1:2], params[1:2], [make_generator(params[1], "cpu")])
    batched = sample(logits, params, [make_generator(p, "cpu") for p in params])
    print("greedy row == argmax:", batched[0] == int(logits[0].argmax()))
    print("seeded row alone == in batch:", alone[0] == batched[1])
    print("top-k row within the top 5:", batched[1] in logits[1].topk(5).indices.tolist())
