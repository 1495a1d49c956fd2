"""LLM.int8(): vector-wise int8 matmul with a 16-bit decomposition for outlier features.

Paper: Dettmers, Lewis, Belkada, Zettlemoyer 2022, "LLM.int8(): 8-bit Matrix Multiplication for
Transformers at Scale", arXiv:2208.07339, §3.
- §3.1 vector-wise quantization: X_f16 [T, K] gets one absmax scale per row c_x [T], W [N, K] one
  per output channel c_w [N]; C_i32 = X_i8 · W_i8ᵀ is accumulated exactly in int32 and dequantized
  by the outer product: Y ≈ C_i32 ⊙ (c_x c_wᵀ) (Eq. 4, with s = 127/absmax, i.e. c = absmax/127).
- §3.2 mixed-precision decomposition: feature dimensions (columns of X) holding any |x| ≥ α
  (α = 6) are the outlier set O; Y = X_O · W_Oᵀ (16-bit) + dequant(X_{¬O,i8} · W_{¬O,i8}ᵀ) (Eq. 5).
  The outliers are < 0.1% of features but, left in, set the row scale and wipe out the rest.

The int8 product goes through ``torch._int_mm`` where it applies (CPU; CUDA with M > 16 and K, N
multiples of 8) and otherwise an exact emulation: int8 products are < 2^14, so an fp64 matmul is
exact for any K < 2^39 and is cast back to int32.

Left out: the row-wise/col-wise layout tricks and fused kernels of bitsandbytes; training
(backward, fp16 master weights). As in bitsandbytes' inference path, the outlier columns of W are
read back from the int8 weight (W_O = W_i8[:, O]·c_w), so only int8 weights are stored.

The one idea to notice: the outliers live in a *few fixed feature dimensions*, so splitting by
column keeps 99.9% of the multiply in int8 and the part that would break absmax in 16-bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mlsys_ref.quant.primitives import quantize

__all__ = ["int8_matmul", "int_mm_applies", "Int8Linear", "llm_int8_matmul", "outlier_columns"]


def int_mm_applies(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether torch._int_mm takes (a [M, K], b [K, N]) on this device and these shapes."""
    if not hasattr(torch, "_int_mm"):
        return False
    if a.device.type == "cpu":
        return True
    M, K = a.shape
    return a.device.type == "cuda" and M > 16 and K % 8 == 0 and b.shape[1] % 8 == 0


def int8_matmul(a: torch.Tensor, b: torch.Tensor, use_int_mm: bool | None = None) -> torch.Tensor:
    """Exact int32 product of int8 a [M, K] and b [K, N]."""
    if a.dtype != torch.int8 or b.dtype != torch.int8 or a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"int8_matmul needs int8 a [M, K] and b [K, N], got {a.dtype} {tuple(a.shape)} "
                         f"and {b.dtype} {tuple(b.shape)}")
    if use_int_mm is None:
        use_int_mm = int_mm_applies(a, b)
    if use_int_mm:
        return torch._int_mm(a.contiguous(), b)
    return (a.double() @ b.double()).to(torch.int32)  # exact: |sum| < 2^14·K < 2^53


def outlier_columns(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Indices of feature dimensions (last dim of x [T, K]) where any |x| >= threshold (§3.2)."""
    return (x.abs() >= threshold).any(dim=0).nonzero().flatten()


def llm_int8_matmul(x: torch.Tensor, W_i8: torch.Tensor, c_w: torch.Tensor, threshold: float | None = 6.0,
                    use_int_mm: bool | None = None) -> torch.Tensor:
    """Y [T, N] = X [T, K] · Ŵᵀ with vector-wise int8 and (threshold not None) the outlier decomposition.

    W_i8 int8 [N, K], c_w [N, 1] its per-channel scales. Returns x's dtype.
    """
    if x.dim() != 2 or x.shape[1] != W_i8.shape[1]:
        raise ValueError(f"x must be [T, K={W_i8.shape[1]}], got {tuple(x.shape)}")
    if not x.is_floating_point() or not torch.isfinite(x).all():
        raise ValueError("x must be a finite floating-point tensor")
    x32 = x.float()
    outliers = outlier_columns(x32, threshold) if threshold is not None else None
    y = torch.zeros(x.shape[0], W_i8.shape[0], device=x.device)
    if outliers is not None and outliers.numel():
        x_o = x32[:, outliers]  # [T, |O|] the 16-bit part
        # in the 16-bit dtype of the model, as the paper does (fp32 stays fp32)
        y += (x_o.to(x.dtype) @ (W_i8[:, outliers].float() * c_w).to(x.dtype).T).float()
        x32 = x32.index_fill(1, outliers, 0.0)  # the rest no longer sees the outliers' scale
    X_i8, c_x, _ = quantize(x32, 8, symmetric=True, granularity="token")  # [T, K], [T, 1]
    C_i32 = int8_matmul(X_i8.to(torch.int8), W_i8.T, use_int_mm)  # [T, N] exact int32
    y += C_i32.float() * (c_x * c_w.T)  # Eq. 4: outer product of row and column scales
    return y.to(x.dtype)


class Int8Linear(nn.Module):
    """nn.Linear with an int8 weight [N, K] and per-channel scales [N, 1]; activations quantized per token
    at run time. ``threshold`` α: LLM.int8()'s outlier decomposition; None: plain W8A8 (SmoothQuant)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, threshold: float | None = 6.0,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        if threshold is not None and not threshold > 0:
            raise ValueError(f"threshold must be positive or None, got {threshold}")
        self.in_features, self.out_features, self.threshold = in_features, out_features, threshold
        self.register_buffer("weight_i8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, 1, device=device))  # c_w
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: float | None = 6.0) -> "Int8Linear":
        W = linear.weight.detach()
        if not torch.isfinite(W).all():
            raise ValueError("linear.weight holds NaN or inf")
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, threshold,
                     dtype=W.dtype, device=W.device)
        q, c_w, _ = quantize(W.float(), 8, symmetric=True, granularity="channel")
        module.weight_i8.copy_(q.to(torch.int8))
        module.weight_scale.copy_(c_w)
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach())
        return module

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        y = llm_int8_matmul(x.reshape(-1, self.in_features), self.weight_i8, self.weight_scale, self.threshold)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must be [..., {self.in_features}], got {tuple(x.shape)}")
        return self._matmul(x)

    def weight_bytes(self) -> int:
        return self.weight_i8.numel() + self.weight_scale.numel() * self.weight_scale.element_size()

    def config(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "threshold": self.threshold,
                "dtype": str(self.bias.dtype if self.bias is not None else torch.float32).removeprefix("torch.")}

    @classmethod
    def from_config(cls, config: dict) -> "Int8Linear":
        return cls(**{**config, "dtype": getattr(torch, config["dtype"])})

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, threshold={self.threshold}"


if __name__ == "__main__":
    torch.manual_seed(0)
    T, K, N = 64, 256, 128
    x = torch.randn(T, K)
    x[:, [3, 77]] *= 40  # two outlier feature dimensions, as in §4 of the paper
    linear = nn.Linear(K, N, bias=False)
    exact = linear(x)
    for threshold in (None, 6.0):
        y = Int8Linear.from_linear(linear, threshold)(x)
        rel = ((y - exact).norm() / exact.norm()).item()
        print(f"threshold {threshold}: relative error vs fp matmul {rel:.4f}")
    a, b = torch.randint(-127, 128, (33, 200), dtype=torch.int8), torch.randint(-127, 128, (200, 24), dtype=torch.int8)
    print("int32 path exact:", torch.equal(int8_matmul(a, b), (a.long() @ b.long()).int()),
          "| emulation exact:", torch.equal(int8_matmul(a, b, use_int_mm=False), (a.long() @ b.long()).int()))
