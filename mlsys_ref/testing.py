"""One tolerance table by dtype, and a comparison that explains its failures.

Every test, the tour and the notebooks compare against references with these numbers.
Never widen a tolerance to make a test pass: find the bug (STYLE.md, point 6).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Tolerance", "TOLERANCES", "tolerance", "max_error", "assert_close"]


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float

    def bound(self, reference: torch.Tensor) -> torch.Tensor:
        return self.atol + self.rtol * reference.abs()


# fp32 after long reductions (attention rows, matmul with large K) lands near 1e-5 relative;
# fp16 has 11 significant bits (~5e-4 per rounding), bf16 8 bits (~4e-3 per rounding).
TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(atol=1e-10, rtol=1e-8),
    torch.float32: Tolerance(atol=1e-5, rtol=1e-5),
    torch.float16: Tolerance(atol=2e-3, rtol=2e-3),
    torch.bfloat16: Tolerance(atol=2e-2, rtol=2e-2),
}


def tolerance(dtype: torch.dtype) -> Tolerance:
    if dtype not in TOLERANCES:
        raise ValueError(f"no tolerance for dtype {dtype}; known: {list(TOLERANCES)}")
    return TOLERANCES[dtype]


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference, computed in fp64; inf if either side holds NaN where the other doesn't."""
    actual64, expected64 = actual.detach().double().cpu(), expected.detach().double().cpu()
    nan_mismatch = torch.isnan(actual64) != torch.isnan(expected64)
    if nan_mismatch.any():
        return float("inf")
    both_finite = torch.isfinite(actual64) & torch.isfinite(expected64)
    inf_mismatch = (~both_finite) & (actual64 != expected64) & ~torch.isnan(actual64)
    if inf_mismatch.any():
        return float("inf")
    if not both_finite.any():
        return 0.0
    return float((actual64 - expected64)[both_finite].abs().max())


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    dtype: torch.dtype | None = None,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    name: str = "output",
    show: int = 5,
) -> None:
    """assert |actual - expected| <= atol + rtol*|expected| everywhere, NaN only where expected has NaN.

    The tolerance comes from the table for ``dtype`` (default: ``actual.dtype``); on failure
    the message gives the mismatch count, the worst indices with both values, and NaN/inf positions.
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    table = tolerance(dtype or actual.dtype)
    atol = table.atol if atol is None else atol
    rtol = table.rtol if rtol is None else rtol
    actual64, expected64 = actual.detach().double().cpu(), expected.detach().double().cpu()
    difference = (actual64 - expected64).abs()
    bad = ~(difference <= atol + rtol * expected64.abs())
    same_nonfinite = (actual64 == expected64) | (torch.isnan(actual64) & torch.isnan(expected64))
    bad &= ~same_nonfinite
    if not bad.any():
        return
    count, total = int(bad.sum()), bad.numel()
    lines = [f"{name}: {count}/{total} elements differ beyond atol={atol:g}, rtol={rtol:g}"]
    ranked = torch.where(bad, difference.nan_to_num(float("inf")), torch.zeros_like(difference))
    for flat in ranked.flatten().topk(min(show, count)).indices.tolist():
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), bad.shape))
        lines.append(f"  at {index}: actual={actual64[index].item():.6g} expected={expected64[index].item():.6g}")
    for label, mask in (("NaN", torch.isnan(actual64)), ("inf", torch.isinf(actual64))):
        if mask.any():
            where = [tuple(i.tolist()) for i in mask.nonzero()[:show]]
            lines.append(f"  actual has {int(mask.sum())} {label} (first at {where})")
    raise AssertionError("\n".join(lines))
