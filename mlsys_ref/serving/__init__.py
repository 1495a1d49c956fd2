"""Serving: a Llama-style model, paged KV cache, continuous batching and speculative decoding."""
