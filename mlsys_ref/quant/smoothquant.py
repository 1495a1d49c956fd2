"""SmoothQuant: migrate activation outliers into the weights, then W8A8.

Paper: Xiao, Lin, Seznec, Wu, Demouth, Han 2023, "SmoothQuant: Accurate and Efficient
Post-Training Quantization for Large Language Models", arXiv:2211.10438, §4.
Y = X W (paper's layout; ours is y = x Wᵀ with W [N, K]). For any positive s [K],
Y = (X diag(s)⁻¹)(diag(s) W): per-channel maxima of the activations max|X_j| come from calibration
and the smoothing factors (Eq. 4) are

    s_j = max|X_j|^α / max|W_j|^(1−α),     α = 0.5 by default (migration strength),

which equalises the two ranges so both quantize well. diag(s)⁻¹ is folded into the layer that
produces X (an RMSNorm/LayerNorm gain, or the rows of a preceding linear), so smoothing costs
nothing at run time; then every linear runs W8A8 (int8 per-token activations × int8 per-channel
weights, see :class:`mlsys_ref.quant.llm_int8.Int8Linear` with ``threshold=None``).

Smoothing alone is an exact identity in real arithmetic (and in fp32 up to rounding; bit-exact
when the s_j are powers of two, which tests use).

Pairs (producer, consumers) for a Llama block, found by :func:`llama_smooth_pairs`:
input norm -> q/k/v (as the paper), post-attention norm -> gate/up (the paper's FC1), and, as
later Llama ports do, up_proj -> down_proj (down's input is silu(gate) ⊙ up, linear in up's rows).
o_proj is left unsmoothed: with grouped-query attention one v channel feeds several o_proj inputs.

Left out: static (calibrated) activation scales and per-tensor settings O1-O3, fused int8 kernels.

The one idea to notice: the difficulty is *moved*, not removed: activations get easier to quantize
exactly as much as the weights get harder, and weights start out easy.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

__all__ = ["smoothing_factors", "fold_smoothing", "collect_input_absmax", "llama_smooth_pairs", "smooth_model"]


def smoothing_factors(act_absmax: torch.Tensor, weights: Iterable[torch.Tensor], alpha: float = 0.5,
                      power_of_two: bool = False) -> torch.Tensor:
    """s [K] = max|X_j|^α / max|W_j|^(1−α), the weight max over every consumer of X (Eq. 4)."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if act_absmax.dim() != 1 or not torch.isfinite(act_absmax).all():
        raise ValueError("act_absmax must be a finite 1-D tensor [K]")
    w_absmax = torch.cat([w.detach().abs().float() for w in weights], dim=0).amax(dim=0)  # [K]
    if w_absmax.shape != act_absmax.shape:
        raise ValueError(f"weights have K={w_absmax.shape[0]}, act_absmax has {act_absmax.shape[0]}")
    # clamps as in the reference code: a dead channel (max 0) keeps s = 1-ish instead of 0 or inf
    s = act_absmax.float().clamp(min=1e-5).pow(alpha) / w_absmax.clamp(min=1e-5).pow(1 - alpha)
    if power_of_two:  # rounding s to 2^k keeps smoothing bit-exact in floating point
        s = torch.exp2(torch.round(torch.log2(s)))
    return s


@torch.no_grad()
def fold_smoothing(producer: nn.Module, consumers: list[nn.Linear], s: torch.Tensor) -> None:
    """X → X diag(s)⁻¹ folded into ``producer``; W → W diag(s) in every consumer (in place)."""
    if not consumers:
        raise ValueError("consumers must list at least one nn.Linear")
    for linear in consumers:
        if not isinstance(linear, nn.Linear) or linear.in_features != s.shape[0]:
            raise TypeError(f"consumers must be nn.Linear with in_features={s.shape[0]}, got {linear}")
    if isinstance(producer, nn.Linear):
        if producer.out_features != s.shape[0]:
            raise ValueError(f"producer has out_features={producer.out_features}, s has {s.shape[0]}")
        producer.weight.div_(s[:, None].to(producer.weight.dtype))  # output rows: [N=K, K_prev]
        if producer.bias is not None:
            producer.bias.div_(s.to(producer.bias.dtype))
    elif getattr(producer, "weight", None) is not None and producer.weight.shape == s.shape:  # a norm's gain
        producer.weight.div_(s.to(producer.weight.dtype))
        if getattr(producer, "bias", None) is not None:
            producer.bias.div_(s.to(producer.bias.dtype))
    else:
        raise TypeError(f"producer must be an nn.Linear or a norm with a [K] gain, got {type(producer).__name__}")
    for linear in consumers:
        linear.weight.mul_(s[None, :].to(linear.weight.dtype))


@torch.no_grad()
def collect_input_absmax(model: nn.Module, names: list[str], run: Callable[[nn.Module], object]) -> dict[str, torch.Tensor]:
    """Per-input-channel max|x| [K] of each named module, over one calibration ``run(model)``."""
    modules = dict(model.named_modules())
    stats: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).abs().float()
            if not torch.isfinite(x).all():
                raise ValueError(f"calibration activations into {name} hold NaN or inf")
            m = x.amax(dim=0)
            stats[name] = m if name not in stats else torch.maximum(stats[name], m)
        return record

    handles = [modules[name].register_forward_pre_hook(hook(name)) for name in names]
    try:
        run(model)
    finally:
        for handle in handles:
            handle.remove()
    return stats


# (producer, consumers) name patterns, relative to a decoder block: mlsys_ref's Llama, then HF Llama
_PATTERNS = [
    ("attn_norm", ["attention.q_proj", "attention.k_proj", "attention.v_proj"]),
    ("mlp_norm", ["mlp.gate_proj", "mlp.up_proj"]),
    ("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
    ("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"]),
    ("mlp.up_proj", ["mlp.down_proj"]),
]


def llama_smooth_pairs(model: nn.Module) -> list[tuple[str, list[str]]]:
    """Every (producer, consumers) of the patterns above found in ``model`` (full module names)."""
    modules = dict(model.named_modules())
    pairs = []
    for block in modules:
        prefix = f"{block}." if block else ""
        for producer, consumers in _PATTERNS:
            names = [prefix + c for c in consumers]
            if prefix + producer in modules and all(n in modules for n in names):
                pairs.append((prefix + producer, names))
    return pairs


@torch.no_grad()
def smooth_model(model: nn.Module, pairs: list[tuple[str, list[str]]], act_absmax: dict[str, torch.Tensor],
                 alpha: float = 0.5, power_of_two: bool = False) -> None:
    """Fold smoothing into every pair; ``act_absmax[consumers[0]]`` holds that input's channel maxima."""
    modules = dict(model.named_modules())
    for producer, consumers in pairs:
        linears = [modules[name] for name in consumers]
        s = smoothing_factors(act_absmax[consumers[0]], [l.weight for l in linears], alpha, power_of_two)
        fold_smoothing(modules[producer], linears, s)


if __name__ == "__main__":
    from mlsys_ref.serving.model import Llama, LlamaConfig
    from mlsys_ref.testing import max_error

    torch.manual_seed(0)
    model = Llama.random(LlamaConfig.tiny())
    tokens = torch.randint(0, model.config.vocab_size, (2, 17))
    before = model.forward_dense(tokens)
    pairs = llama_smooth_pairs(model)
    stats = collect_input_absmax(model, [c[0] for _, c in pairs], lambda m: m.forward_dense(tokens))
    smooth_model(model, pairs, stats, alpha=0.5)
    print(f"{len(pairs)} smoothing pairs; logits after smoothing vs before: max error "
          f"{max_error(model.forward_dense(tokens), before):.2e} (fp32)")
