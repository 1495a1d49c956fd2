"""A Llama-style decoder in plain PyTorch whose attention is a callback, so any KV cache can serve it.

Papers: Llama (Touvron et al. 2023, arXiv:2302.13971, §2.2 "Architecture"): pre-normalization with
RMSNorm (Zhang & Sennrich 2019, arXiv:1910.07467, eq. 4), SwiGLU feed-forward (Shazeer 2020,
arXiv:2002.05202, eq. 6), rotary position embeddings (Su et al. 2021, RoFormer, arXiv:2104.09864,
§3.4.2), and grouped-query attention (Ainslie et al. 2023, arXiv:2305.13245, §2.2) from Llama 2 on.
Llama 3's long-context RoPE frequency scaling ("rope_type": "llama3") is supported because it only
changes the inverse frequencies.

The one idea to notice: ``forward`` takes a *packed* step -- ``T`` tokens from any mix of sequences
with their positions -- and never sees a cache. Each layer hands its rotated ``q``, ``k`` and ``v``
to ``attend(layer, q, k, v)``; the callback stores k and v wherever its cache keeps them (contiguous
in ``generate.py``, paged blocks in the engine) and returns the attention output. Everything else
in a decoder layer is per token, so the model does not care which token belongs to which sequence.

Left out: training (no dropout, no loss), attention bias terms, sliding windows, RoPE scaling
other than Llama 3's, and tensor parallelism. The rotary layout is the "rotate half" one of
Hugging Face transformers (pairs ``(i, i + D/2)``); GGUF files use the interleaved one and the
loader permutes q/k rows back.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["LlamaConfig", "Llama", "RMSNorm", "Attend", "rope_inverse_frequencies", "apply_rope", "dense_attend"]

# attend(layer_index, q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D]) -> out [T, Hq, D]
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class LlamaConfig:
    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_layers: int = 30
    num_heads: int = 9
    num_kv_heads: int = 3
    head_dim: int = 64
    rope_theta: float = 100000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 8192
    tie_embeddings: bool = True
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    # Llama 3 style: {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}; None = plain RoPE.
    rope_scaling: dict | None = field(default=None)

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_scaling is not None and self.rope_scaling.get("rope_type", self.rope_scaling.get("type")) != "llama3":
            raise ValueError(f"only llama3 rope_scaling is supported, got {self.rope_scaling!r}")

    @classmethod
    def tiny(cls, **overrides) -> "LlamaConfig":
        """A 2-layer random-weight config with GQA (6 query / 2 KV heads) and odd sizes, for fast tests."""
        values = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_layers=2, num_heads=6,
                      num_kv_heads=2, head_dim=8, rope_theta=10000.0, rms_norm_eps=1e-5,
                      max_position_embeddings=256, tie_embeddings=True, bos_token_id=1, eos_token_id=2)
        values.update(overrides)
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) · g  (Zhang & Sennrich 2019, eq. 4), computed in fp32 (or fp64)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16/fp16 would lose the mean of squares
        wide = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * wide.to(x.dtype)


def rope_inverse_frequencies(config: LlamaConfig) -> torch.Tensor:
    """θ_i = base^(-2i/D), i < D/2 (RoFormer eq. 15); with Llama 3 scaling, low frequencies are divided by ``factor``."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))  # [D/2]
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    # Llama 3 (Dubey et al. 2024, arXiv:2407.21783 §3.3 / Meta's reference code): wavelengths longer than
    # original_len / low_freq_factor are slowed by `factor`, shorter than original_len / high_freq_factor
    # kept, and the band between interpolated smoothly.
    factor, low, high = scaling["factor"], scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    original = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    smooth = (original / wavelength - low) / (high - low)
    interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
    middle = (wavelength <= original / low) & (wavelength >= original / high)
    return torch.where(middle, interpolated, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x_i, x_{i+D/2}) by angle position·θ_i. x [T, H, D]; cos/sin [T, D] (fp32)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # "rotate half"
    wide = torch.promote_types(x.dtype, torch.float32)
    out = x.to(wide) * cos[:, None, :].to(wide) + rotated.to(wide) * sin[:, None, :].to(wide)
    return out.to(x.dtype)


class Attention(nn.Module):
    """Projections and RoPE of one layer; the attention itself is the ``attend`` callback (GQA inside it)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [T, hidden] -> q [T, Hq, D], k [T, Hkv, D] (both rotated), v [T, Hkv, D]."""
        T = x.shape[0]
        q = self.q_proj(x).view(T, self.num_heads, self.head_dim)  # [T, Hq, D]
        k = self.k_proj(x).view(T, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = self.v_proj(x).view(T, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) ⊙ up(x))  (Shazeer 2020, eq. 6, with β = 1)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x += attn(norm(x)); x += mlp(norm(x))  (Llama §2.2)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = Attention(config)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    # The layer is split around the attention so that an engine can compile or capture the two halves
    # on their own (model_runner.py); forward() is just the two halves with ``attend`` between them.
    def before_attention(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Norm, q/k/v projections and RoPE: x [T, hidden] -> (q, k, v)."""
        return self.attention.project(self.attn_norm(x), cos, sin)

    def after_attention(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Output projection and residual, then the MLP block: attention out [T, Hq, D] -> new x [T, hidden]."""
        x = x + self.attention.o_proj(out.reshape(x.shape[0], -1).to(x.dtype))
        return x + self.mlp(self.mlp_norm(x))

    def forward(self, layer: int, x, cos, sin, attend: Attend) -> torch.Tensor:
        q, k, v = self.before_attention(x, cos, sin)
        out = attend(layer, q, k, v)  # [T, Hq, D]
        if out.shape != q.shape:
            raise ValueError(f"attend returned shape {tuple(out.shape)}, expected {tuple(q.shape)}")
        return self.after_attention(x, out)


class Llama(nn.Module):
    """Token embedding, ``num_layers`` decoder layers, final RMSNorm, LM head (tied to the embedding or not)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inverse_frequencies(config), persistent=False)  # [D/2] fp32

    def _apply(self, fn, recurse=True):
        # .to(bfloat16) would also round the RoPE frequencies (3 significant digits: angles off by whole
        # radians at position ~1000); recompute them in fp32 on whatever device the model now lives on
        super()._apply(fn, recurse)
        self.inv_freq = rope_inverse_frequencies(self.config).to(self.inv_freq.device)
        return self

    @classmethod
    def random(cls, config: LlamaConfig, seed: int = 0, std: float = 0.1) -> "Llama":
        """Random weights (normal, std ``std``; norm gains near 1) -- deterministic for a given seed."""
        generator = torch.Generator().manual_seed(seed)
        model = cls(config)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                noise = torch.randn(parameter.shape, generator=generator)
                parameter.copy_(1.0 + 0.1 * noise if name.endswith("norm.weight") else std * noise)
        return model.eval()

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of angles position·θ_i, each [T, D] (both halves equal).

        Always fp32, as Hugging Face and llama.cpp do (so fp64 runs match them bit for bit in the
        angles); the angle's rounding error grows with the position, ~position · 6e-8 rad.
        """
        angles = positions.float()[:, None] * self.inv_freq.float()[None, :]  # [T, D/2]
        angles = torch.cat((angles, angles), dim=-1)  # [T, D]
        return angles.cos(), angles.sin()

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        attend: Attend,
        logits_indices: torch.Tensor | None = None,
        num_layers: int | None = None,
    ) -> torch.Tensor:
        """Logits (fp32) of a packed step: tokens/positions [T] -> [T or len(logits_indices), vocab].

        ``num_layers`` runs only the first layers, then the final norm and head: the truncated
        self-draft of speculative decoding (layers past it never see ``attend``).
        """
        if logits_indices is not None and (logits_indices.dim() != 1 or logits_indices.dtype != torch.int64):
            raise ValueError("logits_indices must be a 1-D int64 tensor")
        x = self.hidden_states(tokens, positions, attend, num_layers)  # [T, hidden]
        if logits_indices is not None:
            x = x[logits_indices]  # only the rows that will be sampled pay for the head
        return self.lm_head(self.norm(x)).float()

    def hidden_states(self, tokens: torch.Tensor, positions: torch.Tensor, attend: Attend,
                      num_layers: int | None = None) -> torch.Tensor:
        """The residual stream after the first ``num_layers`` layers (default all), before the final norm: [T, hidden]."""
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1 or tokens.dtype != torch.int64:
            raise ValueError(f"tokens must be a 1-D int64 tensor, got {getattr(tokens, 'shape', type(tokens))} {getattr(tokens, 'dtype', '')}")
        if not isinstance(positions, torch.Tensor) or positions.shape != tokens.shape or positions.dtype != torch.int64:
            raise ValueError(f"positions must be an int64 tensor of shape {tuple(tokens.shape)}, got {getattr(positions, 'shape', type(positions))}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.config.vocab_size):
            raise ValueError(f"tokens must lie in [0, {self.config.vocab_size}), got range [{int(tokens.min())}, {int(tokens.max())}]")
        if positions.numel() and int(positions.min()) < 0:
            raise ValueError("positions must be non-negative")
        depth = self.config.num_layers if num_layers is None else num_layers
        if not 1 <= depth <= self.config.num_layers:
            raise ValueError(f"num_layers must be in [1, {self.config.num_layers}], got {num_layers}")

        cos, sin = self.rope(positions)
        x = self.embed_tokens(tokens)  # [T, hidden]
        for index in range(depth):
            x = self.layers[index](index, x, cos, sin, attend)
        return x

    def forward_dense(self, tokens: torch.Tensor, num_layers: int | None = None) -> torch.Tensor:
        """No cache: causal attention over each row of tokens [B, S] -> logits [B, S, vocab] (fp32)."""
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
            raise ValueError(f"tokens must be a 2-D [batch, seq] tensor, got {getattr(tokens, 'shape', type(tokens))}")
        B, S = tokens.shape
        positions = torch.arange(S, device=tokens.device).repeat(B)  # [B*S]
        logits = self.forward(tokens.reshape(-1).long(), positions, dense_attend(B, S), num_layers=num_layers)
        return logits.view(B, S, -1)


def dense_attend(batch: int, seq: int) -> Attend:
    """An attend callback for ``batch`` packed sequences of equal length ``seq``: causal, no cache, materialized."""
    from mlsys_ref.attention.reference import attention_reference

    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        def split(t):  # [B*S, H, D] -> [B, H, S, D]
            return t.view(batch, seq, *t.shape[1:]).transpose(1, 2)

        out, _ = attention_reference(split(q), split(k), split(v), causal=True)
        return out.transpose(1, 2).reshape(q.shape)

    return attend


if __name__ == "__main__":
    from mlsys_ref.testing import max_error

    torch.manual_seed(0)
    config = LlamaConfig.tiny()
    model = Llama.random(config)
    tokens = torch.randint(0, config.vocab_size, (2, 13))
    dense = model.forward_dense(tokens)
    # the same logits, one token at a time, re-running the whole prefix each time (no cache)
    last = torch.stack([model.forward_dense(tokens[:, : s + 1])[:, -1] for s in range(13)], dim=1)
    print(f"tiny Llama {sum(p.numel() for p in model.parameters())} params; "
          f"dense vs prefix-by-prefix max error {max_error(dense, last):.2e}")
