"""Tour rows for quantization: each technique at small sizes against its reference (see mlsys_ref/tour.py)."""

from __future__ import annotations

import torch
from torch import nn

from mlsys_ref.testing import max_error, tolerance
from mlsys_ref.tour import Check


def _int4_pack_round_trip(device: torch.device) -> tuple[float, float]:
    from mlsys_ref.quant.linear import QuantizedLinear
    from mlsys_ref.quant.primitives import pack_int4, unpack_int4

    u = torch.randint(0, 16, (37, 96), device=device)
    error = max_error(unpack_int4(pack_int4(u)).float(), u.float())
    q = u - 8  # symmetric codes go through the +8 offset
    ql = QuantizedLinear.from_codes(q, torch.ones(37, 3, device=device), None, 4)
    return max(error, max_error(ql.codes().float(), q.float())), 0.0  # packing is exact


def _llm_int8_vs_fp(device: torch.device) -> tuple[float, float]:
    """Worst |Y_int8 − XWᵀ| divided by its analytic bound: must be <= 1.

    Half a step δx (rows of X without the outlier columns) and δw (rows of W) give
    |error| <= Σ_k |x_k| δw + δx Σ_k |w_k| + K δx δw (outlier columns only carry δw).
    """
    from mlsys_ref.quant.llm_int8 import Int8Linear, outlier_columns

    x = torch.randn(37, 96, device=device)
    x[:, [5, 60]] *= 30  # outlier features
    linear = nn.Linear(96, 29, bias=False, device=device).requires_grad_(False)
    y = Int8Linear.from_linear(linear, 6.0)(x).double()
    W, xd = linear.weight.double(), x.double()
    rest = xd.index_fill(1, outlier_columns(x, 6.0), 0.0)
    dx, dw = rest.abs().amax(1, keepdim=True) / 254, W.abs().amax(1, keepdim=True) / 254  # absmax/127/2
    bound = xd.abs().sum(1, keepdim=True) @ dw.T + dx @ W.abs().sum(1, keepdim=True).T + 96 * dx @ dw.T
    return float(((y - xd @ W.T).abs() / bound).max()), 1.0


def _smoothquant_identity(device: torch.device) -> tuple[float, float]:
    from mlsys_ref.quant.smoothquant import fold_smoothing, smoothing_factors

    norm = nn.LayerNorm(64, device=device)
    q, k = (nn.Linear(64, 48, device=device) for _ in range(2))
    x = torch.randn(37, 64, device=device)
    x[:, 7] *= 50
    with torch.no_grad():
        before = torch.cat((q(norm(x)), k(norm(x))), 1)
        s = smoothing_factors(norm(x).abs().amax(0), [q.weight, k.weight], 0.5)
        fold_smoothing(norm, [q, k], s)
        after = torch.cat((q(norm(x)), k(norm(x))), 1)
    return max_error(after, before), tolerance(torch.float32).atol


def _gptq_vs_reference(device: torch.device) -> tuple[float, float]:
    from mlsys_ref.quant.gptq import gptq_quantize, gptq_reference

    X = torch.randn(64, 64, dtype=torch.float64, device=device) @ torch.randn(64, 300, dtype=torch.float64, device=device)
    W = torch.randn(13, 64, dtype=torch.float64, device=device)
    H = 2 * X @ X.T / 300
    fast = gptq_quantize(W, H, 4, 16, act_order=True, blocksize=24)
    slow = gptq_reference(W.cpu(), H.cpu(), 4, 16, act_order=True)
    return max_error(fast.dequantize(), slow.dequantize()), tolerance(torch.float64).atol


def _w4a16_kernel_vs_dequant(device: torch.device) -> tuple[float, float]:
    """Triton W4A16 (GEMV at M = 1, GEMM at M = 37) vs dequantize-then-matmul, act-order, g32 asymmetric."""
    from mlsys_ref.quant.linear import QuantizedLinear
    from mlsys_ref.quant.qmatmul import quant_matmul, quant_matmul_reference

    ql = QuantizedLinear.from_linear(nn.Linear(160, 45), 4, 32, symmetric=False).to(device)
    ql = QuantizedLinear.from_codes(ql.codes(), ql.scales, ql.zeros, 4, perm=torch.randperm(160, device=device))
    args = (ql.qweight, ql.scales, ql.zeros)
    table, error, bound = tolerance(torch.float16), 0.0, float("inf")
    for M in (1, 37):
        x = torch.randn(M, 160, device=device, dtype=torch.float16)
        y = quant_matmul(x, *args, bits=4, perm=ql.perm)
        expected = quant_matmul_reference(x.double(), *args, bits=4, perm=ql.perm)
        error = max(error, max_error(y, expected))
        bound = min(bound, table.atol + table.rtol * float(expected.abs().max()))  # the table's bound at |y|max
    return error, bound


CHECKS = [
    Check("int4 pack/unpack round trip", "Frantar et al. 2022 §5 (storage)", _int4_pack_round_trip),
    Check("LLM.int8() vs fp matmul (error/bound)", "Dettmers et al. 2022 §3", _llm_int8_vs_fp),
    Check("SmoothQuant smoothing is an identity", "Xiao et al. 2023 §4", _smoothquant_identity),
    Check("GPTQ vs column-by-column reference", "Frantar et al. 2022 Alg. 1", _gptq_vs_reference),
    Check("W4A16 Triton kernel vs dequantize-then-matmul", "Frantar et al. 2022 §5; Frantar et al. 2024 §3",
          _w4a16_kernel_vs_dequant),
]
