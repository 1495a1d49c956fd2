"""Tour rows for attention: each technique at small sizes against the reference (see mlsys_ref/tour.py)."""

from __future__ import annotations

import functools

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


def _online_softmax_kernel_against_torch(device: torch.device) -> tuple[float, float]:
    from mlsys_ref.attention.online_softmax import softmax

    x = torch.randn(8, 300, device=device) * 10
    x[0, :100] = float("-inf")  # the first blocks of a row all -inf: the running max starts at -inf
    x[1, 7] = float("-inf")
    errors = [max_error(softmax(x, block_size=block), torch.softmax(x.double(), -1)) for block in (None, 64)]
    return max(errors), tolerance(torch.float32).atol


def _forward_backward_error(attention, device: torch.device) -> tuple[float, float]:
    """Worst error of O, lse and dQ, dK, dV of ``attention(q, k, v, causal=True, return_lse=True)`` against
    the reference, at GQA 4:2 with Sq=37, Sk=45 (odd lengths, q_len != kv_len: bottom-right causal)."""
    q = torch.randn(2, 4, 37, 32, device=device, requires_grad=True)
    k, v = (torch.randn(2, 2, 45, 32, device=device, requires_grad=True) for _ in range(2))
    out, lse = attention(q, k, v, causal=True, return_lse=True)
    expected, expected_lse = attention_reference(q, k, v, causal=True)
    dO = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dO)
    expected_grads = torch.autograd.grad(expected, (q, k, v), dO)
    errors = [max_error(out, expected), max_error(lse, expected_lse)]
    errors += [max_error(g, e) for g, e in zip(grads, expected_grads)]
    return max(errors), tolerance(torch.float32).atol


def _flash_torch_against_reference(device: torch.device) -> tuple[float, float]:
    from mlsys_ref.attention.flash_torch import flash_attention_torch

    return _forward_backward_error(functools.partial(flash_attention_torch, Br=16, Bc=12), device)


def _flash_triton_against_reference(device: torch.device) -> tuple[float, float]:
    from mlsys_ref.attention.flash_triton import flash_attention

    return _forward_backward_error(flash_attention, device)


def _flash_decoding_against_reference(device: torch.device) -> tuple[float, float]:
    from mlsys_ref.attention.flash_decoding import flash_decode

    q = torch.randn(2, 8, 3, 64, device=device)
    k_cache, v_cache = (torch.randn(2, 2, 100, 64, device=device) for _ in range(2))
    lengths = [100, 57]
    out = flash_decode(q, k_cache, v_cache, cache_seqlens=torch.tensor(lengths, device=device), num_splits=3)
    errors = [
        max_error(out[b : b + 1], attention_reference(q[b : b + 1], k_cache[b : b + 1, :, :n], v_cache[b : b + 1, :, :n], causal=True)[0])
        for b, n in enumerate(lengths)
    ]
    return max(errors), tolerance(torch.float32).atol


CHECKS = [
    Check("reference attention vs torch SDPA", "Vaswani et al. 2017 §3.2.1", _reference_against_sdpa),
    Check("online softmax, Triton kernel vs torch.softmax", "Milakov & Gimelshein 2018, Alg. 3", _online_softmax_kernel_against_torch),
    Check("FlashAttention-2 in PyTorch, fwd+bwd vs reference", "Dao 2023, Alg. 1-2", _flash_torch_against_reference),
    Check("FlashAttention-2 in Triton, fwd+bwd vs reference", "Dao 2023, Alg. 1-2, §3.2", _flash_triton_against_reference),
    Check("flash-decoding (split-KV), Triton vs reference", "Dao et al. 2023, Flash-Decoding", _flash_decoding_against_reference),
]
