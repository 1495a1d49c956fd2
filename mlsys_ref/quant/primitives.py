"""Quantization primitives: absmax and zero-point integer quantization, int4 packing, fp8 scaling.

Paper: the integer schemes are those surveyed in Gholami et al. 2021, "A Survey of Quantization
Methods for Efficient Neural Network Inference" (arXiv:2103.13630) §3 (uniform, symmetric vs
asymmetric, granularity); Jacob et al. 2018 (arXiv:1712.05877) §2.1 gives the zero-point form
``r = S (q - Z)`` with the zero exactly representable. fp8 formats: Micikevicius et al. 2022,
"FP8 Formats for Deep Learning" (arXiv:2209.05433) §2-3 (E4M3 with one NaN and no inf, E5M2
IEEE-like), scaled so that the tensor's absmax lands on the format's largest finite value.

Schemes (b = bits):
- symmetric (absmax):  s = max|x| / (2^(b-1) - 1),  q = clamp(round(x/s), -2^(b-1), 2^(b-1)-1),  x ≈ q·s
- asymmetric (zero-point): range widened to include 0, s = (max - min) / (2^b - 1),
  z = round(-min/s),  q = clamp(round(x/s) + z, 0, 2^b - 1),  x ≈ (q - z)·s
Both keep 0 exact (q = 0, resp. q = z) and, without clipping, |x - x̂| <= s/2 per element.

Granularity, for x of shape [rows, K] (any leading dims for "token"):
"tensor" one scale; "channel" one per row (a weight's output channel, scales [N, 1]);
"group" one per row and run of ``group_size`` columns (scales [N, K/group_size]);
"token" one per row of an activation [..., K] (scales [..., 1]).

int4 packing (the storage format of :mod:`mlsys_ref.quant.linear`): two codes per byte along K,
``packed[n, j] = (u[n, 2j] & 0xF) | ((u[n, 2j+1] & 0xF) << 4)`` with u the unsigned nibble
(symmetric codes are stored offset by +8).

Left out: stochastic rounding, learned/MSE-searched clipping ranges (GPTQ's ``mse`` option),
non-uniform codebooks (NF4), and fp8 with delayed scaling.

The one idea to notice: the scale is chosen per *group of values that share a range*; finer
granularity costs one scale per group and buys a smaller s, hence a smaller s/2 error bound.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = [
    "QTensor", "qrange", "quant_params", "quantize", "dequantize", "expand_groups",
    "pack_int4", "unpack_int4", "quantize_fp8", "dequantize_fp8", "FP8_DTYPES",
]

GRANULARITIES = ("tensor", "channel", "group", "token")
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


class QTensor(NamedTuple):
    q: torch.Tensor  # integer codes, int32 [same shape as x]
    scale: torch.Tensor  # float32, broadcastable per group (see quant_params)
    zero: torch.Tensor | None  # float32 integer-valued zero point, same shape as scale; None if symmetric


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Smallest and largest integer code."""
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in [2, 8], got {bits!r}")
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _check_float(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {type(x).__name__} "
                        f"{getattr(x, 'dtype', '')}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or inf; quantization needs finite values")


def _work(x: torch.Tensor) -> torch.Tensor:
    """Compute in fp32, or fp64 when given fp64 (the tests' exact references)."""
    return x if x.dtype == torch.float64 else x.float()


def _grouped(x: torch.Tensor, granularity: str, group_size: int | None) -> torch.Tensor:
    """View x so that each quantization group is one row of the last dim: [..., groups, members]."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity == "tensor":
        return x.reshape(1, -1)
    if granularity in ("channel", "token"):
        if x.dim() < 1 or (granularity == "channel" and x.dim() != 2):
            raise ValueError(f"granularity {granularity!r} needs x [rows, K] (token: [..., K]), got {tuple(x.shape)}")
        return x.unsqueeze(-2)  # [..., 1, K]
    if x.dim() != 2:
        raise ValueError(f"granularity 'group' needs a 2-D weight [N, K], got {tuple(x.shape)}")
    if not isinstance(group_size, int) or group_size <= 0 or x.shape[1] % group_size:
        raise ValueError(f"group_size must be a positive int dividing K={x.shape[1]}, got {group_size!r}")
    return x.reshape(x.shape[0], x.shape[1] // group_size, group_size)  # [N, K/g, g]


def quant_params(
    x: torch.Tensor, bits: int, *, symmetric: bool = True, granularity: str = "channel",
    group_size: int | None = None, integer_zero: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale, zero) for x. Shapes: tensor [1, 1]; channel [N, 1]; group [N, K/g]; token [..., 1].

    ``integer_zero=False`` (asymmetric only): the grid is exactly [min, max] with a fractional
    zero point z = -min/s, i.e. x̂ = q·s + min -- llama.cpp's Q4_1 form. 0 is then not exact.
    """
    _check_float(x, "x")
    lo, hi = qrange(bits, symmetric)
    grouped = _grouped(_work(x), granularity, group_size)  # [..., groups, members]
    if symmetric:
        absmax = grouped.abs().amax(dim=-1)
        scale = absmax / hi
        zero = None
    else:
        xmin, xmax = grouped.amin(dim=-1), grouped.amax(dim=-1)
        if integer_zero:  # widen the range to include 0 so that 0 has an exact code (q = z)
            xmin, xmax = xmin.clamp(max=0), xmax.clamp(min=0)
        scale = (xmax - xmin) / (hi - lo)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant group: any s is exact
    if not symmetric:
        zero = torch.round(-xmin / scale).clamp(lo, hi) if integer_zero else -xmin / scale
    if granularity == "tensor":  # channel/token are already [..., 1], group [N, K/g]
        scale = scale.reshape(1, 1)
        zero = None if zero is None else zero.reshape(1, 1)
    return scale, zero


def expand_groups(p: torch.Tensor, K: int) -> torch.Tensor:
    """Scales/zeros [..., G] -> [..., K] (each group's value repeated over its K/G columns)."""
    return p.repeat_interleave(K // p.shape[-1], dim=-1)


def quantize(
    x: torch.Tensor, bits: int, *, symmetric: bool = True, granularity: str = "channel",
    group_size: int | None = None, integer_zero: bool = True,
) -> QTensor:
    """Round-to-nearest integer codes of x with the scheme's own scale (and zero point)."""
    scale, zero = quant_params(x, bits, symmetric=symmetric, granularity=granularity, group_size=group_size,
                               integer_zero=integer_zero)
    return QTensor(quantize_with(x, scale, zero, bits), scale, zero)


def quantize_with(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Codes of x for given scale/zero ([..., G] groups along the last dim, or broadcastable)."""
    lo, hi = qrange(bits, zero is None)
    K = x.shape[-1]
    s = expand_groups(scale, K) if scale.shape[-1] not in (1, K) else scale
    q = _work(x) / s
    if zero is not None:  # round after adding z: the same for integer z, right for fractional z
        q = q + (expand_groups(zero, K) if zero.shape[-1] not in (1, K) else zero)
    return torch.round(q).clamp(lo, hi).to(torch.int32)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None) -> torch.Tensor:
    """x̂ = (q - z)·s (z = 0 when symmetric), in fp32; scale/zero may be per group [..., G]."""
    K = q.shape[-1]
    s = expand_groups(scale, K) if scale.shape[-1] not in (1, K) else scale
    if zero is None:
        return q.float() * s
    z = expand_groups(zero, K) if zero.shape[-1] not in (1, K) else zero
    return (q.float() - z) * s


def pack_int4(u: torch.Tensor) -> torch.Tensor:
    """Unsigned nibbles u in [0, 15], [N, K] (K even) -> uint8 [N, K/2], low nibble = even column."""
    if u.dim() != 2 or u.shape[1] % 2:
        raise ValueError(f"pack_int4 needs a 2-D tensor [N, K] with K even, got {tuple(u.shape)}")
    if u.is_floating_point() or u.min() < 0 or u.max() > 15:
        raise ValueError("pack_int4 needs integer codes in [0, 15] (offset symmetric codes by +8 first)")
    u = u.to(torch.uint8)
    return (u[:, 0::2] & 0xF) | ((u[:, 1::2] & 0xF) << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> uint8 [N, K] nibbles in [0, 15] (exact inverse of :func:`pack_int4`)."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"unpack_int4 needs uint8 [N, K/2], got {packed.dtype} {tuple(packed.shape)}")
    low, high = packed & 0xF, packed >> 4
    return torch.stack((low, high), dim=-1).reshape(packed.shape[0], -1)  # [N, K/2, 2] -> [N, K]


def quantize_fp8(
    x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn, granularity: str = "tensor",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x8, scale): x8 = fp8(x / scale) with scale = absmax / finfo(dtype).max per tensor/channel/token."""
    if dtype not in FP8_DTYPES:
        raise ValueError(f"dtype must be one of {FP8_DTYPES}, got {dtype}")
    if granularity == "group":
        raise ValueError("quantize_fp8 supports granularity 'tensor', 'channel' or 'token'")
    _check_float(x, "x")
    grouped = _grouped(x.float(), granularity, None)
    absmax = grouped.abs().amax(dim=-1)
    scale = absmax / torch.finfo(dtype).max
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = scale.reshape(1, 1) if granularity == "tensor" else scale.reshape(*x.shape[:-1], 1)
    # the division can land a hair above max; clamp so the cast never overflows (e4m3fn has no inf)
    finite = torch.finfo(dtype).max
    return (x.float() / scale).clamp(-finite, finite).to(dtype), scale


def dequantize_fp8(x8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x8.float() * scale


if __name__ == "__main__":
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    for bits, sym in ((8, True), (4, False), (3, True)):
        for gran, g in (("channel", None), ("group", 64)):
            qt = quantize(w, bits, symmetric=sym, granularity=gran, group_size=g)
            err = (dequantize(*qt) - w).abs()
            bound = expand_groups(qt.scale, 256) / 2
            print(f"int{bits} {'sym ' if sym else 'asym'} {gran:7s}: max error {err.max():.4f}, "
                  f"within s/2: {bool((err <= bound * (1 + 1e-6) + 1e-7).all())}")
    u = torch.randint(0, 16, (8, 10))
    print("int4 pack/unpack exact:", torch.equal(unpack_int4(pack_int4(u)), u.to(torch.uint8)))
    for dt in FP8_DTYPES:
        x8, s = quantize_fp8(w, dt)
        print(f"{dt}: max relative error {((dequantize_fp8(x8, s) - w).abs() / w.abs()).max():.3f}")
