"""Tour rows for attention: each technique at small sizes against the reference (see mlsys_ref/tour.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mlsys_ref.attention.reference import attention_reference
from mlsys_ref.testing import max_error, tolerance
from mlsys_ref.tour import Check


def _reference_against_sdpa(device: torch.device) -> tuple[float, float]:
    q, k, v = (torch.randn(2, 4, 37, 32, device=device) for _ in range(3))
    out, _ = attention_reference(q, k, v, causal=True)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return max_error(out, expected), tolerance(torch.float32).atol


CHECKS = [
    Check("reference attention vs torch SDPA", "Vaswani et al. 2017 §3.2.1", _reference_against_sdpa),
]
