"""Attention: reference attention, online softmax, FlashAttention (PyTorch and Triton), flash-decoding.

Names are imported lazily (PEP 562), so ``python -m mlsys_ref.attention.<module>`` runs each module's demo
without importing it twice, and importing the package stays cheap.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "attention_reference": "reference",
    "attention_varlen_reference": "reference",
    "softmax_three_pass": "online_softmax",
    "softmax_online": "online_softmax",
    "online_normalizer": "online_softmax",
    "softmax": "online_softmax",
    "flash_attention_torch": "flash_torch",
    "flash_attention": "flash_triton",
    "flash_attention_varlen": "flash_triton",
    "flash_attention_hopper": "flash_triton_hopper",
    "flash_decode": "flash_decoding",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'mlsys_ref.attention' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"mlsys_ref.attention.{_WHERE[name]}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
