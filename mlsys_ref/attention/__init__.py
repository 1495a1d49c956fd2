"""Attention: reference attention, online softmax, FlashAttention (PyTorch and Triton), flash-decoding."""
