"""The single-process reference model that every parallel run is compared with.

A Llama-style decoder (Touvron et al. 2023, arXiv:2302.13971, §2.2): token embedding, ``layers``
pre-norm blocks (RMSNorm, causal self-attention with rotary positions and grouped-query heads,
RMSNorm, SwiGLU MLP), a final RMSNorm, an untied LM head and the mean token cross-entropy.
No biases, no dropout: every parallel version (tensor, pipeline, ZeRO) must reproduce these
outputs, losses and gradients to fp32 rounding, so nothing random may sit in the forward.

Left out: KV cache, tied embeddings, mixed precision. The one idea to notice: every weight is a
plain ``nn.Linear``/``nn.Embedding`` with a Llama name (``q_proj``, ``gate_proj`` ...), so a
parallel layer is built by *slicing* the reference weight, and its gradient is checked by slicing
the reference gradient the same way (``shard`` below).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mlsys_ref.serving.model import RMSNorm  # the same norm as the serving Llama (fp32 inside, so bf16 runs keep it)

__all__ = ["ModelConfig", "RMSNorm", "rope", "causal_attention", "Block", "ReferenceModel", "shard", "make_batch"]


@dataclass(frozen=True)
class ModelConfig:
    vocab: int = 96
    hidden: int = 64
    heads: int = 8
    kv_heads: int = 4
    ffn: int = 96
    layers: int = 4
    rope_base: float = 10000.0
    eps: float = 1e-5

    def __post_init__(self):
        for name in ("vocab", "hidden", "heads", "kv_heads", "ffn", "layers"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def parameter_count(self) -> int:
        attention = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        block = attention + 3 * self.hidden * self.ffn + 2 * self.hidden
        return 2 * self.vocab * self.hidden + self.layers * block + self.hidden


def rope(x: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary positions (Su et al. 2021, arXiv:2104.09864, eq. 34), half-split layout. x: [b, heads, s, d]."""
    seq, dim = x.shape[-2], x.shape[-1]
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float32, device=x.device) / dim)  # [d/2]
    angle = torch.arange(seq, dtype=torch.float32, device=x.device)[:, None] * inv_freq  # [s, d/2]
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    x1, x2 = x[..., : dim // 2], x[..., dim // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def causal_attention(q, k, v, base: float):
    """q: [b, Hq, s, d], k/v: [b, Hkv, s, d] -> [b, s, Hq*d]. Query head h reads KV head h // (Hq/Hkv)."""
    q, k = rope(q, base), rope(k, base)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # softmax(q kᵀ/√d + causal mask) v: [b, Hq, s, d]
    return out.transpose(1, 2).flatten(2)


class Attention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.c = c
        self.q_proj = nn.Linear(c.hidden, c.heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden, c.kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden, c.kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.heads * c.head_dim, c.hidden, bias=False)

    def forward(self, x):  # [b, s, hidden]
        b, s, _ = x.shape
        d = self.c.head_dim
        q = self.q_proj(x).view(b, s, -1, d).transpose(1, 2)  # [b, Hq, s, d]
        k = self.k_proj(x).view(b, s, -1, d).transpose(1, 2)  # [b, Hkv, s, d]
        v = self.v_proj(x).view(b, s, -1, d).transpose(1, 2)
        return self.o_proj(causal_attention(q, k, v, self.c.rope_base))


class MLP(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden, c.ffn, bias=False)
        self.up_proj = nn.Linear(c.hidden, c.ffn, bias=False)
        self.down_proj = nn.Linear(c.ffn, c.hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(c.hidden, c.eps), Attention(c)
        self.mlp_norm, self.mlp = RMSNorm(c.hidden, c.eps), MLP(c)

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class ReferenceModel(nn.Module):
    """tokens [b, s] -> logits [b, s, vocab]; ``loss(tokens, targets)`` is the mean cross-entropy."""

    def __init__(self, c: ModelConfig, seed: int = 0):
        super().__init__()
        self.c = c
        generator = torch.Generator().manual_seed(seed)
        self.embed = nn.Embedding(c.vocab, c.hidden)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.norm = RMSNorm(c.hidden, c.eps)
        self.head = nn.Linear(c.hidden, c.vocab, bias=False)
        with torch.no_grad():  # seeded, so every rank of a parallel run builds the same reference
            for name, p in self.named_parameters():
                if not name.endswith("norm.weight"):
                    p.copy_(torch.randn(p.shape, generator=generator) * (1.0 if "embed" in name else 0.1))
                else:
                    p.copy_(1 + 0.1 * torch.randn(p.shape, generator=generator))

    def forward(self, tokens):
        x = self.embed(tokens)  # [b, s, hidden]
        for block in self.layers:
            x = block(x)
        return self.head(self.norm(x))  # [b, s, vocab]

    def loss(self, tokens, targets):
        return F.cross_entropy(self.forward(tokens).flatten(0, 1), targets.flatten())


def shard(full: torch.Tensor, dim: int | None, rank: int, size: int) -> torch.Tensor:
    """The ``rank``-th of ``size`` contiguous chunks of ``full`` along ``dim`` (``None``: replicated)."""
    if dim is None or size == 1:
        return full
    if full.shape[dim] % size:
        raise ValueError(f"dim {dim} of shape {tuple(full.shape)} is not divisible by {size}")
    return full.chunk(size, dim=dim)[rank]


def make_batch(c: ModelConfig, batch: int, seq: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, c.vocab, (batch, seq), generator=generator)
    targets = torch.randint(0, c.vocab, (batch, seq), generator=generator)
    return tokens, targets


if __name__ == "__main__":
    c = ModelConfig()
    model = ReferenceModel(c)
    tokens, targets = make_batch(c, batch=2, seq=12)
    loss = model.loss(tokens, targets)
    print(f"reference Llama-style model, {c.parameter_count()} parameters "
          f"(counted {sum(p.numel() for p in model.parameters())}), loss {loss.item():.4f} "
          f"(ln vocab = {math.log(c.vocab):.4f})")
