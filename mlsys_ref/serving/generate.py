"""Reference generation: one sequence, a plain contiguous KV cache per layer, greedy or sampled.

This is the naive reference the serving engine (paged cache, continuous batching) and speculative
decoding are compared against token for token. The cache is the textbook one of autoregressive
Transformer decoding (Vaswani et al. 2017, arXiv:1706.03762, §3; e.g. Pope et al. 2022,
arXiv:2211.05102, §2): keys and values of every past position are kept, so each new token costs one
forward over one position instead of re-running the whole prefix.

The one idea to notice: the model never sees the cache. ``ContiguousKVCache.attend`` is the
callback ``Llama.forward`` calls per layer; it appends that layer's new k, v and attends the new
queries to everything stored (bottom-right causal). ``truncate(n)`` forgets positions ≥ n, which is
all speculative decoding needs to roll back rejected draft tokens.

Left out: batching (one sequence only -- the engine batches), memory reuse between requests, top-k /
top-p (the engine's sampler has them). Conventions: ``generate`` returns only the new tokens, and a
stop token that ends generation is included as the last one.
"""

from __future__ import annotations

import torch

from mlsys_ref.attention.reference import attention_reference
from mlsys_ref.serving.model import Llama, LlamaConfig

__all__ = ["ContiguousKVCache", "generate", "sample_next", "model_attend_dense"]


class ContiguousKVCache:
    """k, v of one sequence per layer, each ``[capacity <= max_len, Hkv, D]``; ``len(cache)`` positions are valid."""

    def __init__(self, config: LlamaConfig, max_len: int | None = None, dtype=torch.float32, device="cpu"):
        max_len = config.max_position_embeddings if max_len is None else max_len
        if not isinstance(max_len, int) or max_len <= 0:
            raise ValueError(f"max_len must be a positive int, got {max_len!r}")
        self.max_len = max_len
        capacity = min(max_len, 256)  # grows by doubling up to max_len: a long context limit costs nothing up front
        shape = (capacity, config.num_kv_heads, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.lengths = [0] * config.num_layers  # each layer advances when it is attended

    def __len__(self) -> int:
        return self.lengths[0]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Append k, v [T, Hkv, D] at the end of ``layer``'s cache; q [T, Hq, D] attends to all of it."""
        start, T = self.lengths[layer], q.shape[0]
        if start + T > self.max_len:
            raise ValueError(f"KV cache full: {start} + {T} tokens > max_len {self.max_len}")
        if start + T > self.k[layer].shape[0]:
            capacity = min(self.max_len, max(start + T, 2 * self.k[layer].shape[0]))
            for store in (self.k, self.v):
                grown = store[layer].new_zeros((capacity, *store[layer].shape[1:]))
                grown[:start] = store[layer][:start]
                store[layer] = grown
        self.k[layer][start:start + T] = k
        self.v[layer][start:start + T] = v
        self.lengths[layer] = end = start + T
        keys = self.k[layer][:end].transpose(0, 1)[None]  # [1, Hkv, end, D]
        values = self.v[layer][:end].transpose(0, 1)[None]
        # bottom-right causal: the T new queries sit at positions start..end-1
        out, _ = attention_reference(q.transpose(0, 1)[None], keys, values, causal=True)
        return out[0].transpose(0, 1)  # [T, Hq, D]

    def truncate(self, num_tokens: int) -> None:
        """Keep the first ``num_tokens`` positions (speculative-decoding rollback)."""
        if not 0 <= num_tokens <= len(self):
            raise ValueError(f"num_tokens must be in [0, {len(self)}], got {num_tokens}")
        self.lengths = [num_tokens] * len(self.lengths)

    def positions(self, count: int, device=None) -> torch.Tensor:
        """Positions of the next ``count`` tokens: len(cache) .. len(cache)+count-1."""
        return torch.arange(len(self), len(self) + count, device=device)


def model_attend_dense(model: Llama, tokens: list[int] | torch.Tensor, num_layers: int | None = None) -> torch.Tensor:
    """Logits [S, vocab] of one sequence by full recompute (``forward_dense``), no cache."""
    ids = torch.as_tensor(tokens, dtype=torch.long, device=model.embed_tokens.weight.device)
    return model.forward_dense(ids[None], num_layers=num_layers)[0]


def sample_next(logits: torch.Tensor, temperature: float = 0.0, generator: torch.Generator | None = None) -> int:
    """Greedy (temperature 0: argmax, lowest id on ties) or a draw from softmax(logits / temperature)."""
    if temperature == 0.0:
        return int(torch.argmax(logits))
    probabilities = torch.softmax(logits.float() / temperature, dim=-1)
    return int(torch.multinomial(probabilities, 1, generator=generator))


@torch.no_grad()
def generate(
    model: Llama,
    prompt_ids: list[int],
    max_tokens: int,
    stop_token_ids: list[int] | tuple[int, ...] | None = None,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> list[int]:
    """Generate up to ``max_tokens`` new tokens after ``prompt_ids``; stop after emitting a stop token.

    ``stop_token_ids`` defaults to the config's eos id (pass ``[]`` to never stop early).
    ``use_cache=False`` re-runs the whole sequence each step (the reference for the reference).
    """
    config = model.config
    if not isinstance(prompt_ids, (list, tuple)) or not prompt_ids:
        raise ValueError("prompt_ids must be a non-empty list of token ids")
    if any(not isinstance(t, int) or not 0 <= t < config.vocab_size for t in prompt_ids):
        raise ValueError(f"prompt_ids must be ints in [0, {config.vocab_size})")
    if not isinstance(max_tokens, int) or max_tokens < 0:
        raise ValueError(f"max_tokens must be a non-negative int, got {max_tokens!r}")
    if len(prompt_ids) + max_tokens > config.max_position_embeddings:
        raise ValueError(f"prompt ({len(prompt_ids)}) + max_tokens ({max_tokens}) exceeds the context "
                         f"({config.max_position_embeddings})")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if stop_token_ids is None:
        stop_token_ids = [] if config.eos_token_id is None else [config.eos_token_id]
    stops = set(stop_token_ids)
    device = model.embed_tokens.weight.device

    output: list[int] = []
    if max_tokens == 0:
        return output
    cache = ContiguousKVCache(config, len(prompt_ids) + max_tokens, model.embed_tokens.weight.dtype, device) if use_cache else None
    step_tokens = list(prompt_ids)
    while len(output) < max_tokens:
        if cache is not None:
            tokens = torch.tensor(step_tokens, device=device)
            last = torch.tensor([len(step_tokens) - 1], device=device)
            logits = model(tokens, cache.positions(len(step_tokens), device), cache.attend, last)[0]
        else:
            logits = model_attend_dense(model, list(prompt_ids) + output)[-1]
        token = sample_next(logits, temperature, generator)
        output.append(token)
        if token in stops:
            break
        step_tokens = [token]
    return output


if __name__ == "__main__":
    config = LlamaConfig.tiny()
    model = Llama.random(config)
    prompt = [5, 17, 42, 3, 88, 13, 7]
    cached = generate(model, prompt, 20, stop_token_ids=[])
    recomputed = generate(model, prompt, 20, stop_token_ids=[], use_cache=False)
    print(f"greedy with cache:    {cached}\ngreedy by recompute:  {recomputed}\nequal: {cached == recomputed}")
