"""Attention: reference attention, online softmax, FlashAttention (PyTorch and Triton), flash-decoding."""

from mlsys_ref.attention.flash_decoding import flash_decode
from mlsys_ref.attention.flash_torch import flash_attention_torch
from mlsys_ref.attention.flash_triton import flash_attention, flash_attention_varlen
from mlsys_ref.attention.online_softmax import online_normalizer, softmax, softmax_online, softmax_three_pass
from mlsys_ref.attention.reference import attention_reference, attention_varlen_reference

__all__ = [
    "attention_reference",
    "attention_varlen_reference",
    "flash_attention",
    "flash_attention_torch",
    "flash_attention_varlen",
    "flash_decode",
    "online_normalizer",
    "softmax",
    "softmax_online",
    "softmax_three_pass",
]
