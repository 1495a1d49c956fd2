"""QuantizedLinear: the weight-only quantized ``nn.Linear`` and its storage format.

Weight-only quantization as in GPTQ (Frantar et al. 2022, arXiv:2210.17323, §5 "Practical
speedups": weights stored in low precision, dequantized for the matmul) and the group-wise
zero-point layout its reference code and most int4 kernels share. RTN, GPTQ and act-order GPTQ all
produce this one module; the Triton kernels (issue 7) read exactly these buffers.

Storage format (fixed; kernels depend on it). W is the nn.Linear weight, [N (out), K (in)].
- codes q. symmetric: w ≈ q·s, q ∈ [-2^(b-1), 2^(b-1)-1]; asymmetric: w ≈ (q - z)·s, q ∈ [0, 2^b-1].
- ``qweight``:
    bits 4: uint8 [N, K/2] (K even), two codes per byte along K:
            ``qweight[n, j] = (u[n, 2j] & 0xF) | ((u[n, 2j+1] & 0xF) << 4)``, with u = q (asymmetric)
            or u = q + 8 (symmetric, so u ∈ [0, 15]); low nibble = even column.
    bits 8 and 3 (and 2, 5-7): one code per byte, [N, K]: int8 if symmetric, uint8 if asymmetric
            (asymmetric 8-bit codes reach 255). int3 is not packed.
- ``scales``: [N, K // group_size] (per channel: group_size = K, so [N, 1]); dtype fp32 by default
  (exact on the CPU), fp16/bf16 allowed via ``scale_dtype``. Group g covers stored columns
  [g·group_size, (g+1)·group_size).
- ``zeros``: same shape as scales, floats in code units, asymmetric only; None when symmetric (then
  absent from the state dict). Integer-valued (0 exact) unless built with ``integer_zero=False``
  (llama.cpp's Q4_1 grid x̂ = q·s + min, i.e. z = -min/s); kernels must not assume integers.
- ``perm``: int64 [K] or None (act-order). Columns are stored permuted, W_stored = W[:, perm], and
  groups run over the *stored* order; at run time y = x[..., perm] @ dequant(W_stored)ᵀ + bias.
- ``bias``: [N] in the float dtype, or None.
Attributes (not tensors): ``bits``, ``group_size``, ``symmetric``, ``in_features``, ``out_features``.

Left out: packing int3 (10 codes in 32 bits) and int2; fused kernels (issue 7 plugs into
:meth:`QuantizedLinear._matmul`); activation quantization (see llm_int8.py, smoothquant.py).

The one idea to notice: the module holds *only* codes, scales, zeros and a permutation; every
method (RTN, GPTQ, act-order) differs in how it picks the codes, never in how they are read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mlsys_ref.quant.primitives import expand_groups, pack_int4, qrange, quantize, unpack_int4

__all__ = ["QuantizedLinear", "check_format"]


def check_format(in_features: int, bits: int, group_size: int | None) -> int:
    """Validate (K, bits, group_size); return the effective group size (K when per channel)."""
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in [2, 8], got {bits!r}")
    group = in_features if group_size in (None, -1) else group_size
    if not isinstance(group, int) or group <= 0 or in_features % group:
        raise ValueError(f"group_size must divide in_features={in_features} (or be None/-1 for per "
                         f"channel), got {group_size!r}")
    if bits == 4 and in_features % 2:
        raise ValueError(f"int4 packs two codes per byte along K: in_features must be even, got {in_features}")
    return group


class QuantizedLinear(nn.Module):
    """y = x[..., perm] @ dequant(qweight, scales, zeros)ᵀ + bias (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, bits: int = 4, group_size: int | None = None,
                 symmetric: bool = True, bias: bool = False, act_order: bool = False,
                 scale_dtype: torch.dtype = torch.float32, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.symmetric = bits, bool(symmetric)
        self.group_size = check_format(in_features, bits, group_size)
        K, N, G = in_features, out_features, in_features // self.group_size
        if bits == 4:
            qweight = torch.zeros(N, K // 2, dtype=torch.uint8, device=device)
        else:
            qweight = torch.zeros(N, K, dtype=torch.int8 if symmetric else torch.uint8, device=device)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", torch.ones(N, G, dtype=scale_dtype, device=device))
        self.register_buffer("zeros", None if symmetric else torch.zeros(N, G, dtype=scale_dtype, device=device))
        self.register_buffer("perm", torch.arange(K, device=device) if act_order else None)
        self.register_buffer("bias", torch.zeros(N, dtype=dtype, device=device) if bias else None)

    # -- building one from codes --------------------------------------------------------------
    @classmethod
    def from_codes(cls, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                   bias: torch.Tensor | None = None, perm: torch.Tensor | None = None,
                   scale_dtype: torch.dtype = torch.float32) -> "QuantizedLinear":
        """From integer codes q [N, K] (stored column order), scales/zeros [N, K/group_size]."""
        N, K = q.shape
        if scales.dim() != 2 or scales.shape[0] != N or K % scales.shape[1]:
            raise ValueError(f"scales must be [N={N}, G] with G dividing K={K}, got {tuple(scales.shape)}")
        if zeros is not None and zeros.shape != scales.shape:
            raise ValueError(f"zeros must have the shape of scales {tuple(scales.shape)}, got {tuple(zeros.shape)}")
        lo, hi = qrange(bits, zeros is None)
        if q.is_floating_point() or q.min() < lo or q.max() > hi:
            raise ValueError(f"codes must be integers in [{lo}, {hi}] for bits={bits}, "
                             f"{'symmetric' if zeros is None else 'asymmetric'}")
        if perm is not None and (perm.shape != (K,) or not torch.equal(perm.sort().values.cpu(), torch.arange(K))):
            raise ValueError(f"perm must be a permutation of range({K})")
        module = cls(K, N, bits, K // scales.shape[1], symmetric=zeros is None, bias=bias is not None,
                     act_order=perm is not None, scale_dtype=scale_dtype,
                     dtype=bias.dtype if bias is not None else torch.float32, device=q.device)
        module.qweight.copy_(cls.pack(q, bits, zeros is None))
        module.scales.copy_(scales)
        if zeros is not None:
            module.zeros.copy_(zeros)
        if perm is not None:
            module.perm.copy_(perm)
        if bias is not None:
            module.bias.copy_(bias.detach())
        return module

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int | None = None,
                    symmetric: bool = True, scale_dtype: torch.dtype = torch.float32,
                    integer_zero: bool = True) -> "QuantizedLinear":
        """Round-to-nearest (RTN) quantization of an nn.Linear's weight (integer_zero: see quant_params)."""
        group = check_format(linear.in_features, bits, group_size)
        W = linear.weight.detach().float()
        q, s, z = quantize(W, bits, symmetric=symmetric, granularity="group", group_size=group,
                           integer_zero=integer_zero)
        return cls.from_codes(q, s, z, bits, bias=linear.bias, scale_dtype=scale_dtype)

    @staticmethod
    def pack(q: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
        """Codes [N, K] -> the qweight buffer of the storage format."""
        if bits == 4:
            return pack_int4(q + 8 if symmetric else q)
        return q.to(torch.int8 if symmetric else torch.uint8)

    # -- reading it back ----------------------------------------------------------------------
    def codes(self) -> torch.Tensor:
        """Integer codes q [N, K] in stored column order (int32)."""
        if self.bits == 4:
            u = unpack_int4(self.qweight).to(torch.int32)
            return u - 8 if self.symmetric else u
        return self.qweight.to(torch.int32)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Ŵ_stored [N, K] (columns in stored order; see :meth:`weight_in_input_order`)."""
        q = self.codes().float()
        s = expand_groups(self.scales.float(), self.in_features)
        if self.zeros is not None:
            q = q - expand_groups(self.zeros.float(), self.in_features)
        return (q * s).to(dtype)

    def weight_in_input_order(self) -> torch.Tensor:
        """Ŵ [N, K] with columns back in the input's order (undoes act-order), fp32."""
        W = self.dequantize()
        if self.perm is None:
            return W
        return W[:, torch.argsort(self.perm)]

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        """The one place the product happens; issue 7's kernels dispatch here."""
        from mlsys_ref.quant import qmatmul_dispatch  # Triton W4A16/W8A16 kernels where they apply (issue 7)
        if qmatmul_dispatch.kernel_applies(self, x):
            return qmatmul_dispatch.quantized_linear(self, x)
        if self.perm is not None:
            x = x[..., self.perm]  # act-order: reorder inputs instead of the weight
        return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must be [..., {self.in_features}], got {tuple(x.shape)}")
        return self._matmul(x)

    def weight_bytes(self) -> int:
        """Bytes of qweight + scales + zeros + perm (what the weight costs in memory)."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros, self.perm)
                   if t is not None)

    def config(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "bits": self.bits,
                "group_size": self.group_size, "symmetric": self.symmetric, "bias": self.bias is not None,
                "act_order": self.perm is not None, "scale_dtype": str(self.scales.dtype).removeprefix("torch."),
                "dtype": str(self.bias.dtype if self.bias is not None else torch.float32).removeprefix("torch.")}

    @classmethod
    def from_config(cls, config: dict) -> "QuantizedLinear":
        c = dict(config)
        c["scale_dtype"], c["dtype"] = getattr(torch, c["scale_dtype"]), getattr(torch, c["dtype"])
        return cls(**c)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, symmetric={self.symmetric}, act_order={self.perm is not None}")


if __name__ == "__main__":
    from mlsys_ref.testing import max_error

    torch.manual_seed(0)
    linear = nn.Linear(256, 96, bias=True)
    x = torch.randn(5, 256)
    for bits, group, sym in ((4, 64, True), (4, 128, False), (8, None, True), (3, 32, False)):
        ql = QuantizedLinear.from_linear(linear, bits, group, sym)
        reference = F.linear(x, ql.weight_in_input_order(), linear.bias)
        print(f"{ql.extra_repr()}: qweight {tuple(ql.qweight.shape)} {ql.qweight.dtype}, "
              f"forward vs dequantized reference {max_error(ql(x), reference):.2e}, "
              f"vs fp weight {max_error(ql(x), linear(x)):.3f}")
