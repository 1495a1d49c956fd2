"""GPTQ: one-shot weight quantization that compensates each column's rounding error (and RTN).

Paper: Frantar, Ashkboos, Hoefler, Alistarh 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", arXiv:2210.17323, Algorithm 1 and §4 (Steps 1-3).
For a linear layer with weight W [N, K] and calibration inputs X [K, tokens], minimise
‖WX − ŴX‖² row by row. The Hessian of that objective is H = 2XXᵀ [K, K] (shared by all rows).
Quantizing column i to q_i leaves error e = (w_i − q_i) / [H⁻¹]_ii, and the OBS update
W[:, i:] −= e · [H⁻¹]_{i, i:} moves the not-yet-quantized columns to compensate (Step 1, fixed
column order for all rows). Step 2, lazy batches: columns are processed in blocks of B = 128; the
update inside a block is applied at once, and the rest of W gets one rank-B update per block.
Step 3, Cholesky: the successive [H⁻¹] after eliminating columns 0..i-1 are the rows of the upper
Cholesky factor U of H⁻¹ (times √U_ii), so no re-inversion is needed. Plus, as in the paper §4-5
and its code: dampening λ = 1% of mean(diag H), dead columns (H_ii = 0: the input is always 0, set
H_ii = 1 and w_i = 0), group-wise scales computed when a group's first column is reached (from
the already-updated weights), "static groups" computed up front from the original weights, and
act-order (quantize columns in order of decreasing H_ii; the permutation is stored, see
:mod:`mlsys_ref.quant.linear`).

Differences from the reference code (IST-DASLab/gptq), on purpose: a group that begins inside a
block reads its columns' *current* values (the reference reads them before that block's updates);
with act-order, static groups run over the stored (permuted) order, because the storage format has
contiguous groups in stored order (the reference keeps a g_idx into the original order).

Left out: the MSE grid search for clipping (``mse=True``), 3-bit/2-bit packing, the fused
kernels (issue 7). :func:`gptq_reference` is the straightforward column-by-column version (explicit
H⁻¹, eliminated one column at a time) that tests compare against.

The one idea to notice: after rounding a column, its error is not lost; it is pushed onto the
columns still to come, in proportion to how correlated their inputs are (the row [H⁻¹]_{i,:}).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from mlsys_ref.quant.linear import QuantizedLinear, check_format
from mlsys_ref.quant.primitives import qrange, quant_params, quantize, quantize_with

__all__ = ["GPTQResult", "HessianAccumulator", "gptq_quantize", "gptq_reference", "rtn_quantize", "layer_error"]


class GPTQResult(NamedTuple):
    q: torch.Tensor  # int32 codes [N, K], stored (permuted) column order
    scales: torch.Tensor  # [N, K / group_size]
    zeros: torch.Tensor | None  # [N, K / group_size] or None (symmetric)
    perm: torch.Tensor | None  # int64 [K] or None

    def to_linear(self, bits: int, bias: torch.Tensor | None = None) -> QuantizedLinear:
        return QuantizedLinear.from_codes(self.q, self.scales.float(), None if self.zeros is None else self.zeros.float(),
                                          bits, bias=bias, perm=self.perm)

    def dequantize(self) -> torch.Tensor:
        """Ŵ [N, K] in the input's column order."""
        from mlsys_ref.quant.primitives import dequantize

        W = dequantize(self.q, self.scales, self.zeros)
        return W if self.perm is None else W[:, torch.argsort(self.perm)]


class HessianAccumulator:
    """H = 2/n Σ x xᵀ over all n calibration rows seen so far (a running mean, as in the paper's code)."""

    def __init__(self, K: int, device: torch.device | str | None = None):
        self.H = torch.zeros(K, K, device=device)  # [K, K]
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, self.H.shape[0]).float()  # [tokens, K]
        if not torch.isfinite(x).all():
            raise ValueError("calibration activations hold NaN or inf")
        m = x.shape[0]
        self.H *= self.n / (self.n + m)
        self.n += m
        x = x * (2 / self.n) ** 0.5
        self.H += x.T @ x


def _prepare(W: torch.Tensor, H: torch.Tensor, act_order: bool, percdamp: float):
    """Dead columns, act-order permutation, dampening; returns (W, H, perm) in the working order."""
    N, K = W.shape
    if H.shape != (K, K):
        raise ValueError(f"H must be [K, K] = [{K}, {K}], got {tuple(H.shape)}")
    if not (torch.isfinite(W).all() and torch.isfinite(H).all()):
        raise ValueError("W and H must be finite (no NaN or inf)")
    if not 0 <= percdamp < 1:
        raise ValueError(f"percdamp must be in [0, 1), got {percdamp}")
    W, H = W.clone(), H.clone().to(W.dtype)
    dead = torch.diag(H) == 0  # inputs that are always zero: the column cannot matter
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = None
    if act_order:  # largest H_ii first: the columns whose inputs are largest get quantized early
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
    damp = percdamp * torch.mean(torch.diag(H))
    H += damp * torch.eye(K, dtype=H.dtype, device=H.device)
    return W, H, perm


def _static_params(W, bits, group, symmetric):
    s, z = quant_params(W, bits, symmetric=symmetric, granularity="group", group_size=group)
    return s.to(W.dtype), None if z is None else z.to(W.dtype)


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int = 4, group_size: int | None = None,
                  symmetric: bool = False, act_order: bool = False, static_groups: bool = False,
                  blocksize: int = 128, percdamp: float = 0.01) -> GPTQResult:
    """Algorithm 1 with lazy batches and the Cholesky form of H⁻¹. W [N, K], H [K, K]; computes in W's dtype."""
    N, K = W.shape
    group = check_format(K, bits, group_size)
    if blocksize <= 0:
        raise ValueError(f"blocksize must be positive, got {blocksize}")
    W, H, perm = _prepare(W, H, act_order, percdamp)
    G = K // group
    scales = torch.zeros(N, G, dtype=W.dtype, device=W.device)
    zeros = None if symmetric else torch.zeros_like(scales)
    if static_groups:
        s, z = _static_params(W, bits, group, symmetric)
        scales.copy_(s)
        if zeros is not None:
            zeros.copy_(z)
    # -- Step 3: U = chol(H⁻¹)ᵀ (upper); row i of U is the eliminated H⁻¹ row i, scaled by 1/√[H⁻¹]_ii
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros(N, K, dtype=W.dtype, device=W.device)  # codes, as floats until the end
    lo, hi = qrange(bits, symmetric)
    zero_of = torch.zeros_like(scales) if zeros is None else zeros  # a view: sees the groups as they are set
    for i1 in range(0, K, blocksize):  # -- Step 2: lazy batch of B columns
        i2 = min(i1 + blocksize, K)
        W1 = W[:, i1:i2].clone()  # [N, B] the block, updated column by column
        Err1 = torch.zeros_like(W1)  # [N, B] scaled errors e, applied to W[:, i2:] at block end
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % group == 0 and not static_groups:
                # current values of this group's columns: in-block ones live in W1, later ones
                # still miss this block's pending update Err1[:, :i] @ Hinv[i1:i1+i, i2:]
                end = col + group
                current = W1[:, i:min(end, i2) - i1]
                if end > i2:
                    later = W[:, i2:end] - Err1[:, :i] @ Hinv[i1:i1 + i, i2:end]
                    current = torch.cat((current, later), dim=1)
                s, z = quant_params(current, bits, symmetric=symmetric, granularity="channel")
                scales[:, col // group] = s[:, 0].to(W.dtype)
                if zeros is not None:
                    zeros[:, col // group] = z[:, 0].to(W.dtype)
            g = col // group
            w = W1[:, i]  # [N]
            s, z = scales[:, g], zero_of[:, g]  # [N] each (z = 0 when symmetric)
            q = torch.clamp(torch.round(w / s + z), lo, hi)  # the same rounding as quantize_with
            Q[:, col] = q
            err = (w - (q - z) * s) / Hinv1[i, i]  # -- Step 1: the OBS error of this column
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)  # W1[:, i:] -= err ⊗ Hinv1[i, i:]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # the lazy rank-B update of everything after the block
    return GPTQResult(Q.to(torch.int32), scales, zeros, perm)


def gptq_reference(W: torch.Tensor, H: torch.Tensor, bits: int = 4, group_size: int | None = None,
                   symmetric: bool = False, act_order: bool = False, static_groups: bool = False,
                   percdamp: float = 0.01, callback=None) -> GPTQResult:
    """The straightforward version: explicit H⁻¹, one column at a time, eliminating it from H⁻¹ (OBS).

    ``callback(col, W)``, if given, sees the working weights (stored order) after each column's update.
    """
    N, K = W.shape
    group = check_format(K, bits, group_size)
    W, H, perm = _prepare(W, H, act_order, percdamp)
    Hinv = torch.linalg.inv(H)
    G = K // group
    scales = torch.zeros(N, G, dtype=W.dtype)
    zeros = None if symmetric else torch.zeros_like(scales)
    if static_groups:
        s, z = _static_params(W, bits, group, symmetric)
        scales.copy_(s)
        if zeros is not None:
            zeros.copy_(z)
    Q = torch.zeros(N, K, dtype=torch.int32)
    for col in range(K):
        g = col // group
        if col % group == 0 and not static_groups:
            s, z = quant_params(W[:, col:col + group], bits, symmetric=symmetric, granularity="channel")
            scales[:, g] = s[:, 0].to(W.dtype)
            if zeros is not None:
                zeros[:, g] = z[:, 0].to(W.dtype)
        s, z = scales[:, g:g + 1], None if zeros is None else zeros[:, g:g + 1]
        q = quantize_with(W[:, col:col + 1], s, z, bits)
        Q[:, col] = q[:, 0]
        w_hat = ((q.to(W.dtype) - (0 if z is None else z)) * s)[:, 0]
        err = (W[:, col] - w_hat) / Hinv[col, col]
        W -= err[:, None] * Hinv[col][None, :]  # quantized columns have zero rows in Hinv: untouched
        W[:, col] = w_hat
        Hinv -= Hinv[:, col:col + 1] @ Hinv[col:col + 1, :] / Hinv[col, col]  # eliminate column col
        if callback is not None:
            callback(col, W)
    return GPTQResult(Q, scales, zeros, perm)


def rtn_quantize(W: torch.Tensor, bits: int = 4, group_size: int | None = None,
                 symmetric: bool = False) -> GPTQResult:
    """Round-to-nearest, the baseline: each weight rounded on its own, same grid as GPTQ."""
    group = check_format(W.shape[1], bits, group_size)
    q, s, z = quantize(W, bits, symmetric=symmetric, granularity="group", group_size=group)
    return GPTQResult(q, s, z, None)


def layer_error(W: torch.Tensor, W_hat: torch.Tensor, X: torch.Tensor) -> float:
    """‖WX − ŴX‖²_F for X [K, tokens]: the objective GPTQ minimises."""
    return float(((W.double() - W_hat.double()) @ X.double()).pow(2).sum())


if __name__ == "__main__":
    torch.manual_seed(0)
    N, K, T = 48, 256, 1024
    X = torch.randn(K, K) @ torch.randn(K, T) / K**0.5  # correlated inputs [K, tokens]
    W = torch.randn(N, K)
    acc = HessianAccumulator(K)
    acc.add(X.T)
    for bits, group in ((4, None), (4, 64), (3, 64)):
        rtn = layer_error(W, rtn_quantize(W, bits, group).dequantize(), X)
        gptq = layer_error(W, gptq_quantize(W, acc.H, bits, group).dequantize(), X)
        print(f"int{bits} group {group or K:4d}: ‖WX−ŴX‖² RTN {rtn:9.1f}  GPTQ {gptq:9.1f}  ({gptq / rtn:.0%} of RTN)")
    Wd, Hd = W[:8, :64].double(), acc.H[:64, :64].double()
    fast, slow = gptq_quantize(Wd, Hd, 4, 16, act_order=True, blocksize=8), gptq_reference(Wd, Hd, 4, 16, act_order=True)
    print("lazy-batch Cholesky GPTQ == column-by-column reference:", torch.equal(fast.q, slow.q),
          f"(max weight difference {(fast.dequantize() - slow.dequantize()).abs().max():.1e})")
