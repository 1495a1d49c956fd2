"""Model runner: turns a scheduled batch into one packed forward over the paged KV cache.

Papers: vLLM (Kwon et al. 2023, arXiv 2309.06180, §4.1-4.3: block tables and the paged cache),
Sarathi-Serve (Agrawal et al. 2024, arXiv 2403.02310, §4.3: decodes and prefill chunks in one
forward). CUDA graphs for decode follow vLLM's and gpt-fast's practice: a small model's decode
step is launch-bound, so it is captured once per batch size and replayed.

The one idea to notice: every chunk of every sequence becomes rows of ONE flat token batch
(``tokens``, ``positions`` [T]); the per-sequence structure travels beside it as ``slot_mapping``
(where each new K/V goes), ``block_tables`` (where each sequence's past K/V lives), ``cu_seqlens_q``
and ``context_lens``. The model's ``attend`` callback writes K/V into their slots, then runs paged
attention (prefill chunks and decodes together) or the split-KV decode kernel when all rows decode.

Left out: tensor parallelism, multi-step scheduling, logprobs, and graphs for mixed
prefill/decode batches (only pure-decode steps are captured).
"""

from __future__ import annotations

import torch

from mlsys_ref.serving.kv_cache import allocate_kv_cache, copy_blocks, write_kv

__all__ = ["ModelRunner", "StepInputs"]


class StepInputs:
    """The packed tensors of one step (all on the model's device)."""

    def __init__(self, chunks, block_manager, device, pad_blocks_to: int | None = None):
        tokens, positions, slots, tables, cu, lens, sample_rows = [], [], [], [], [0], [], []
        for chunk in chunks:
            seq_id, start, end = chunk.seq.seq_id, chunk.start, chunk.end
            tokens += chunk.seq.token_ids[start:end]
            positions += range(start, end)
            slots += block_manager.slot_mapping(seq_id, start, end)
            tables.append(block_manager.block_table(seq_id))
            cu.append(cu[-1] + end - start)
            lens.append(end)
            if chunk.sample:
                sample_rows.append(cu[-1] - 1)  # the last row of the chunk predicts the next token
        width = max(len(t) for t in tables) if pad_blocks_to is None else pad_blocks_to
        padded = [t + [0] * (width - len(t)) for t in tables]  # padding is never read: context_lens bounds it

        def as_tensor(values, dtype):
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

        self.tokens = as_tensor(tokens, torch.int64)  # [T]
        self.positions = as_tensor(positions, torch.int64)  # [T]
        self.slot_mapping = as_tensor(slots, torch.int64)  # [T] token -> physical slot
        self.block_tables = as_tensor(padded, torch.int32)  # [B, max_blocks] logical -> physical block
        self.cu_seqlens_q = as_tensor(cu, torch.int32)  # [B+1] row offsets of each sequence's queries
        self.context_lens = as_tensor(lens, torch.int32)  # [B] tokens cached after this step
        self.logits_indices = as_tensor(sample_rows, torch.int64)  # [R] rows whose logits are sampled
        self.all_decode = all(c.end - c.start == 1 for c in chunks)
        self.num_seqs = len(chunks)


class ModelRunner:
    """Owns the paged KV cache tensors and runs the model on a batch. ``attention="reference"``
    swaps the Triton kernels for the gather-then-attend PyTorch reference (to check them)."""

    def __init__(self, model, num_blocks: int, block_size: int, attention: str = "triton"):
        if attention not in ("triton", "reference"):
            raise ValueError(f"attention must be 'triton' or 'reference', got {attention!r}")
        self.model, self.block_size, self.attention = model, block_size, attention
        config = model.config
        weight = model.embed_tokens.weight
        self.device, self.dtype = weight.device, weight.dtype
        # per layer (k_cache, v_cache), each [num_blocks, block_size, Hkv, D]
        self.kv_cache = allocate_kv_cache(config.num_layers, num_blocks, block_size, config.num_kv_heads,
                                          config.head_dim, self.dtype, self.device)
        self.graphs = None  # DecodeGraphs, when capture_decode_graphs() was called

    def kv_cache_bytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k, _ in self.kv_cache)

    def copy_blocks(self, pairs) -> None:
        """Copy-on-write copies owed by the block manager, on every layer's cache."""
        for k_cache, v_cache in self.kv_cache:
            copy_blocks(k_cache, v_cache, pairs)

    def make_attend(self, inputs: StepInputs, decode_only: bool):
        from mlsys_ref.serving import paged_attention as pa

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            # q [T, Hq, D] (RoPE applied), k, v [T, Hkv, D] -> out [T, Hq, D]
            k_cache, v_cache = self.kv_cache[layer]
            write_kv(k_cache, v_cache, k.contiguous(), v.contiguous(), inputs.slot_mapping)
            if self.attention == "reference":
                return pa.paged_attention_reference(q, k_cache, v_cache, inputs.block_tables,
                                                    inputs.cu_seqlens_q, inputs.context_lens)
            if decode_only:  # one query row per sequence: the split-KV (flash-decoding) kernel
                return pa.paged_decode(q, k_cache, v_cache, inputs.block_tables, inputs.context_lens)
            return pa.paged_attention(q, k_cache, v_cache, inputs.block_tables, inputs.cu_seqlens_q, inputs.context_lens)

        return attend

    @torch.no_grad()
    def execute(self, chunks, block_manager) -> torch.Tensor:
        """Logits [R, vocab] (fp32) for the chunks that end at their sequence's last token, in order."""
        if self.graphs is not None and self.graphs.can_run(chunks):
            return self.graphs.run(chunks, block_manager)
        inputs = StepInputs(chunks, block_manager, self.device)
        attend = self.make_attend(inputs, decode_only=inputs.all_decode)
        return self.model(inputs.tokens, inputs.positions, attend, inputs.logits_indices)

    def capture_decode_graphs(self, batch_sizes, max_blocks_per_seq: int) -> None:
        """Capture the pure-decode step as CUDA graphs for these batch sizes (CUDA only)."""
        self.graphs = DecodeGraphs(self, batch_sizes, max_blocks_per_seq)
