"""Draft sources for speculative decoding: a small model, the target's own first layers, or n-gram lookup.

- ``ModelDrafter(model)``: a separate small model sharing the target's tokenizer (Leviathan et al.
  2023, arXiv:2211.17192, §3 "M_q"; Chen et al. 2023, arXiv:2302.01318, §2 "draft model").
- ``ModelDrafter(target, num_layers=L)``: truncated self-draft -- the target's first L layers, then
  its final norm and head (early exit, as in LayerSkip, Elhoushi et al. 2024, arXiv:2404.16710 §4 and
  Draft & Verify, Zhang et al. 2023, arXiv:2309.08168 -- which *skips* layers rather than truncating).
  The final norm and head were trained to read layer N, not layer L; ``distill_exit_head`` briefly
  trains a small exit (a residual linear adapter + a copy of the norm, the head frozen) to match the
  target's next-token distribution (KL(p_target ‖ p_draft)), and ``ModelDrafter(..., exit_head=)`` uses it.
- ``NGramDrafter``: prompt-lookup decoding (Saxena 2023, github.com/apoorvumang/prompt-lookup-decoding;
  also "LLMA", Yang et al. 2023, arXiv:2304.04487): find the latest earlier occurrence of the
  context's last n tokens and propose what followed it. No model; its q is one-hot.

Every drafter answers ``propose(context, k, temperature, generator) -> (tokens, q)``: up to ``k``
tokens and the distributions ``q [len(tokens), vocab]`` they were drawn from (``None`` when greedy).
A model drafter keeps its own ``ContiguousKVCache``; before drafting it keeps only the cached prefix
that still agrees with ``context`` (``truncate``) -- that *is* the rollback past rejected drafts.

Left out: sharing the target's KV cache for the self-draft's layers (they are identical
computations), training the layers themselves (LayerSkip's early-exit loss), tree drafts (Medusa, SpecInfer).
"""

from __future__ import annotations

import copy
import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from mlsys_ref.serving.generate import ContiguousKVCache
from mlsys_ref.serving.model import Llama, dense_attend

__all__ = ["ModelDrafter", "NGramDrafter", "ExitHead", "distill_exit_head", "draft_distribution"]


def draft_distribution(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / T) in fp32; T = 0 is greedy and gives the one-hot of the argmax."""
    if temperature == 0.0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return torch.softmax(logits.float() / temperature, dim=-1)


class ModelDrafter:
    """Autoregressive drafting with a (small or truncated) Llama and its own contiguous KV cache."""

    def __init__(self, model: Llama, num_layers: int | None = None, max_len: int | None = None,
                 exit_head: "ExitHead | None" = None):
        depth = model.config.num_layers if num_layers is None else num_layers
        if not isinstance(depth, int) or not 1 <= depth <= model.config.num_layers:
            raise ValueError(f"num_layers must be an int in [1, {model.config.num_layers}], got {num_layers!r}")
        if exit_head is not None and exit_head.num_layers != depth:
            raise ValueError(f"exit_head was distilled for layer {exit_head.num_layers}, not {depth}")
        self.model, self.num_layers, self.exit_head = model, depth, exit_head
        # the cache only needs the layers this drafter runs
        self.config = dataclasses.replace(model.config, num_layers=depth)
        self.max_len = max_len or model.config.max_position_embeddings
        weight = model.embed_tokens.weight
        self.cache = ContiguousKVCache(self.config, self.max_len, weight.dtype, weight.device)
        self.cached_tokens: list[int] = []  # what the cache holds, position by position

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    def rollback(self, context: list[int]) -> None:
        """Keep the longest cached prefix that agrees with ``context`` (and is shorter than it)."""
        keep = 0
        limit = min(len(self.cached_tokens), len(context) - 1)  # the last token must be re-fed for its logits
        while keep < limit and self.cached_tokens[keep] == context[keep]:
            keep += 1
        self.cache.truncate(keep)
        del self.cached_tokens[keep:]

    def _feed(self, tokens: list[int]) -> torch.Tensor:
        device = self.model.embed_tokens.weight.device
        ids = torch.tensor(tokens, device=device)
        last = torch.tensor([len(tokens) - 1], device=device)
        positions = self.cache.positions(len(tokens), device)
        if self.exit_head is None:
            logits = self.model(ids, positions, self.cache.attend, last, num_layers=self.num_layers)
        else:
            hidden = self.model.hidden_states(ids, positions, self.cache.attend, num_layers=self.num_layers)
            logits = self.exit_head(hidden[last])
        self.cached_tokens += tokens
        return logits[0]  # [vocab]

    @torch.no_grad()
    def propose(self, context: list[int], k: int, temperature: float = 0.0,
                generator: torch.Generator | None = None) -> tuple[list[int], torch.Tensor | None]:
        """Draft x_1..x_k ~ q_1..q_k; returns the tokens and q ``[k, vocab]`` (None when greedy)."""
        if len(context) + k > self.max_len:
            raise ValueError(f"context ({len(context)}) + k ({k}) exceeds the drafter's max_len {self.max_len}")
        self.rollback(context)
        logits = self._feed(context[len(self.cached_tokens):])
        tokens, distributions = [], []
        for i in range(k):
            q_i = draft_distribution(logits, temperature)  # [vocab]
            x_i = int(q_i.argmax()) if temperature == 0.0 else int(torch.multinomial(q_i, 1, generator=generator))
            tokens.append(x_i)
            distributions.append(q_i)
            if i + 1 < k:  # x_k is never fed: if it is accepted, the next round feeds it
                logits = self._feed([x_i])
        return tokens, (None if temperature == 0.0 or not tokens else torch.stack(distributions))


class ExitHead(nn.Module):
    """Early exit after layer L: logits = lm_head(norm(h + A h)), A zero-initialised (so it starts as plain truncation)."""

    def __init__(self, model: Llama, num_layers: int):
        super().__init__()
        self.num_layers = num_layers
        self.adapter = nn.Linear(model.config.hidden_size, model.config.hidden_size, bias=False)
        nn.init.zeros_(self.adapter.weight)
        self.adapter.to(model.lm_head.weight)
        self.norm = copy.deepcopy(model.norm)
        # the target's head, shared and frozen (not a parameter of this module)
        self.register_buffer("head_weight", model.lm_head.weight.detach(), persistent=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [T, hidden] -> logits [T, vocab] (fp32)
        return F.linear(self.norm(hidden + self.adapter(hidden)), self.head_weight).float()


def distill_exit_head(model: Llama, num_layers: int, sequences: list[list[int]], steps: int = 200,
                      batch_size: int = 256, lr: float = 1e-3, seed: int = 0) -> ExitHead:
    """Train an ExitHead on ``sequences`` (e.g. text from the target's domain) to minimise KL(p_target ‖ p_exit).

    The layers are not trained: hidden states at layer L and the target's log-probabilities are computed
    once, then only the adapter and the norm's gain learn (a few hundred Adam steps).
    """
    if not sequences or any(len(s) < 2 for s in sequences):
        raise ValueError("sequences must be a non-empty list of token lists, each at least 2 long")
    if not 1 <= num_layers < model.config.num_layers:
        raise ValueError(f"num_layers must be in [1, {model.config.num_layers - 1}] for a self-draft, got {num_layers}")
    device = model.embed_tokens.weight.device
    hidden, target = [], []
    with torch.no_grad():
        for sequence in sequences:
            ids = torch.tensor(sequence, device=device)
            positions = torch.arange(len(sequence), device=device)
            hidden.append(model.hidden_states(ids, positions, dense_attend(1, len(sequence)), num_layers))
            target.append(torch.log_softmax(model.forward_dense(ids[None])[0], dim=-1))
    hidden, target = torch.cat(hidden), torch.cat(target)  # [N, hidden], [N, vocab]
    head = ExitHead(model, num_layers)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        rows = torch.randint(0, hidden.shape[0], (min(batch_size, hidden.shape[0]),), generator=generator).to(device)
        log_q = torch.log_softmax(head(hidden[rows]), dim=-1)
        loss = F.kl_div(log_q, target[rows], log_target=True, reduction="batchmean")  # KL(p ‖ q)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return head.eval().requires_grad_(False)


class NGramDrafter:
    """Prompt lookup: match the last n tokens (n = max_ngram .. min_ngram) earlier in the context, copy what followed."""

    def __init__(self, vocab_size: int, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.vocab_size, self.max_ngram, self.min_ngram = vocab_size, max_ngram, min_ngram

    def lookup(self, context: list[int], k: int) -> list[int]:
        for n in range(min(self.max_ngram, len(context) - 1), self.min_ngram - 1, -1):
            suffix = context[-n:]
            for start in range(len(context) - n - 1, -1, -1):  # latest earlier occurrence first
                if context[start:start + n] == suffix:
                    return context[start + n:start + n + k]
        return []

    def propose(self, context: list[int], k: int, temperature: float = 0.0,
                generator: torch.Generator | None = None) -> tuple[list[int], torch.Tensor | None]:
        tokens = self.lookup(context, k)
        if temperature == 0.0 or not tokens:
            return tokens, None
        # a deterministic draft is a one-hot q: accept x with probability p(x), else resample p without x
        return tokens, torch.nn.functional.one_hot(torch.tensor(tokens), self.vocab_size).float()

    def rollback(self, context: list[int]) -> None:
        """Nothing is cached."""


if __name__ == "__main__":
    from mlsys_ref.serving.model import LlamaConfig

    target = Llama.random(LlamaConfig.tiny(), seed=0, std=0.3)
    context = [5, 17, 42, 3, 88, 13, 7, 5, 17]
    print(f"n-gram lookup after {context}: {NGramDrafter(97).lookup(context, 4)}  (copied from after the earlier '5, 17')")
    drafter = ModelDrafter(target, num_layers=1)
    first, _ = drafter.propose(context, 4)
    again, _ = drafter.propose(context + first[:2] + [60], 4)  # two accepted, then a different token
    fresh, _ = ModelDrafter(target, num_layers=1).propose(context + first[:2] + [60], 4)
    print(f"self-draft: {first}; after rollback {again} == fresh drafter {fresh}: {again == fresh}")
