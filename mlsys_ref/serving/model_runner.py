"""Model runner: turns a scheduled batch into one packed forward over the paged KV cache.

Papers: vLLM (Kwon et al. 2023, arXiv 2309.06180, §4.1-4.3: block tables and the paged cache),
Sarathi-Serve (Agrawal et al. 2024, arXiv 2403.02310, §4.3: decodes and prefill chunks in one
forward). CUDA graphs (``cuda_graphs.py``) follow vLLM's and gpt-fast's practice: a small model's
step is launch-bound, so decode steps are captured once per batch size, steps with prefill chunks once
per padded token count, and replayed; what no graph fits runs eagerly here.

The one idea to notice: every chunk of every sequence becomes rows of ONE flat token batch
(``tokens``, ``positions`` [T]); the per-sequence structure travels beside it as ``slot_mapping``
(where each new K/V goes), ``block_tables`` (where each sequence's past K/V lives), ``cu_seqlens_q``
and ``context_lens``. The model's ``attend`` callback writes K/V into their slots, then runs paged
attention (prefill chunks and decodes together) or the split-KV decode kernel when all rows decode.

Left out: tensor parallelism, multi-step scheduling, logprobs, and overlapping the host's
preparation of step i+1 with the GPU's step i (vLLM v1's async scheduling).
"""

from __future__ import annotations

import torch

from mlsys_ref.serving.kv_cache import allocate_kv_cache, copy_blocks, write_kv

__all__ = ["ModelRunner", "StepInputs", "pack_chunks", "forward_unchecked"]


def pack_chunks(chunks, block_manager):
    """The host-side lists of one step: tokens, positions, slots [T]; block tables (ragged), cu_seqlens_q [B+1],
    context_lens [B], sample_rows [R]. Plain Python lists (one ``torch.tensor`` call each later, no per-sequence
    tensors); a decode chunk (one token) takes a short path, since most chunks of most steps are decodes."""
    tokens, positions, slots, tables, cu, lens, sample_rows = [], [], [], [], [0], [], []
    bs = block_manager.block_size
    for chunk in chunks:
        seq, start, end = chunk.seq, chunk.start, chunk.end
        table = block_manager.block_table(seq.seq_id)
        ids = seq.token_ids
        if end - start == 1:
            tokens.append(ids[start])
            positions.append(start)
            slots.append(table[start // bs] * bs + start % bs)  # = block_manager.slot_mapping
        else:
            tokens += ids[start:end]
            positions += range(start, end)
            slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
        tables.append(table)
        cu.append(cu[-1] + end - start)
        lens.append(end)
        if end == len(ids):  # chunk.sample: the last row of the chunk predicts the next token
            sample_rows.append(cu[-1] - 1)
    return tokens, positions, slots, tables, cu, lens, sample_rows


def padded_tables(tables, width: int) -> torch.Tensor:
    """Ragged block tables -> int32 [B, width] (padding is never read: context_lens bounds it)."""
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)


class StepInputs:
    """The packed tensors of one step (all on the model's device)."""

    def __init__(self, chunks, block_manager, device, pad_blocks_to: int | None = None):
        tokens, positions, slots, tables, cu, lens, sample_rows = pack_chunks(chunks, block_manager)
        width = max(len(t) for t in tables) if pad_blocks_to is None else pad_blocks_to
        packed = torch.tensor([tokens, positions, slots], dtype=torch.int64).to(device, non_blocking=True)  # one copy for three rows
        self.tokens, self.positions, self.slot_mapping = packed[0], packed[1], packed[2]  # [T] each; slot = where K/V goes
        self.block_tables = padded_tables(tables, width).to(device, non_blocking=True)  # [B, max_blocks]
        self.cu_seqlens_q = torch.tensor(cu, dtype=torch.int32).to(device, non_blocking=True)  # [B+1] query row offsets
        self.context_lens = torch.tensor(lens, dtype=torch.int32).to(device, non_blocking=True)  # [B] cached after this step
        self.logits_indices = torch.tensor(sample_rows, dtype=torch.int64).to(device, non_blocking=True)  # [R] rows whose logits are sampled
        self.max_q_len = max(c.end - c.start for c in chunks)  # known here: no device sync in the kernel
        self.all_decode = self.max_q_len == 1
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
        self.mixed_graphs = None  # MixedGraphs, when capture_mixed_graphs() was called
        self.halves = (layer_before_attention, layer_after_attention)  # compiled by compile=True

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
            return pa.paged_attention(q, k_cache, v_cache, inputs.block_tables, inputs.cu_seqlens_q,
                                      inputs.context_lens, max_q_len=inputs.max_q_len)

        return attend

    @torch.no_grad()
    def execute(self, chunks, block_manager) -> torch.Tensor:
        """Logits [R, vocab] (fp32) for the chunks that end at their sequence's last token, in order."""
        if self.graphs is not None and self.graphs.can_run(chunks):
            return self.graphs.run(chunks, block_manager)
        if self.mixed_graphs is not None and self.mixed_graphs.can_run(chunks):
            return self.mixed_graphs.run(chunks, block_manager)
        inputs = StepInputs(chunks, block_manager, self.device)
        attend = self.make_attend(inputs, decode_only=inputs.all_decode)
        # the runner built the inputs, so Llama.forward's value checks (three device syncs) are skipped
        return forward_unchecked(self.model, inputs.tokens, inputs.positions, attend, *self.halves,
                                 logits_indices=inputs.logits_indices)

    def _set_halves(self, compile: bool) -> None:
        # torch.compile the layer halves around attend (fuses norms, RoPE, SwiGLU's elementwise ops: far
        # fewer kernels per step); the attention kernels stay outside. Every path uses the same pair.
        if compile and self.halves == (layer_before_attention, layer_after_attention):
            self.halves = (torch.compile(layer_before_attention), torch.compile(layer_after_attention))

    def capture_decode_graphs(self, batch_sizes, max_blocks_per_seq: int, emulate: bool = False,
                              compile: bool = False) -> None:
        """Capture the pure-decode step as CUDA graphs for these batch sizes (CUDA only; ``emulate`` for tests)."""
        from mlsys_ref.serving.cuda_graphs import DecodeGraphs

        self._set_halves(compile)
        self.graphs = None
        self.graphs = DecodeGraphs(self, batch_sizes, max_blocks_per_seq, emulate)

    def capture_mixed_graphs(self, token_sizes, max_num_seqs: int, max_blocks_per_seq: int, emulate: bool = False,
                             compile: bool = False) -> None:
        """Capture steps with prefill chunks (up to ``max_num_seqs`` sequences, T padded to one of ``token_sizes``)."""
        from mlsys_ref.serving.cuda_graphs import MixedGraphs

        self._set_halves(compile)
        self.mixed_graphs = None
        self.mixed_graphs = MixedGraphs(self, token_sizes, max_num_seqs, max_blocks_per_seq, emulate)


def layer_before_attention(layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """A decoder layer up to ``attend`` (norm, q/k/v projections, RoPE): ``model.DecoderLayer.before_attention``.
    A plain function of the layer so that ``torch.compile`` compiles it once for every layer."""
    return layer.before_attention(x, cos, sin)


def layer_after_attention(layer, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The rest of the layer (output projection, residual, SwiGLU MLP): ``DecoderLayer.after_attention``."""
    return layer.after_attention(x, out)


def forward_unchecked(model, tokens: torch.Tensor, positions: torch.Tensor, attend, before=layer_before_attention,
                      after=layer_after_attention, logits_indices: torch.Tensor | None = None) -> torch.Tensor:
    """``Llama.forward`` split around ``attend`` and without its input checks, which read values back to
    the host (``int(tokens.max())``) and so cannot be captured in a CUDA graph. Inputs come from the
    runner, already valid. ``before``/``after`` may be ``torch.compile``d versions of the two halves
    (the attention kernels stay outside the compiled code). Logits of ``logits_indices`` rows (default all)."""
    cos, sin = model.rope(positions)
    x = model.embed_tokens(tokens)  # [T, hidden]
    for index, layer in enumerate(model.layers):
        q, k, v = before(layer, x, cos, sin)
        x = after(layer, x, attend(index, q, k, v))
    if logits_indices is not None:
        x = x[logits_indices]  # only the rows that will be sampled pay for the head
    return model.lm_head(model.norm(x)).float()


if __name__ == "__main__":
    from mlsys_ref.serving.kv_cache import BlockManager
    from mlsys_ref.serving.model import Llama, LlamaConfig
    from mlsys_ref.serving.sampling import SamplingParams
    from mlsys_ref.serving.scheduler import Chunk, Sequence
    from mlsys_ref.testing import max_error

    model = Llama.random(LlamaConfig.tiny())
    manager = BlockManager(num_blocks=12, block_size=8)
    runner = ModelRunner(model, num_blocks=12, block_size=8)
    prompts = [[(3 * i + j) % 97 for j in range(n)] for i, n in enumerate((21, 6, 13))]
    seqs = [Sequence(i, p, SamplingParams()) for i, p in enumerate(prompts)]
    for seq in seqs:
        manager.allocate(seq.seq_id, seq.token_ids)
    # step 1: a chunk of sequence 0 and all of 1; step 2: the rest of 0 and all of 2 (mixed, packed)
    runner.execute([Chunk(seqs[0], 0, 10), Chunk(seqs[1], 0, 6)], manager)
    logits = runner.execute([Chunk(seqs[0], 10, 21), Chunk(seqs[2], 0, 13)], manager)  # [2, vocab]
    dense = torch.stack([model.forward_dense(torch.tensor([prompts[i]]))[0, -1] for i in (0, 2)])
    inputs = StepInputs([Chunk(seqs[0], 10, 21), Chunk(seqs[2], 0, 13)], manager, "cpu")
    print("packed step: tokens", tuple(inputs.tokens.shape), "cu_seqlens_q", inputs.cu_seqlens_q.tolist(),
          "context_lens", inputs.context_lens.tolist(), "block_tables", inputs.block_tables.tolist())
    print(f"last-token logits through the paged cache vs dense forward: max error {max_error(logits, dense):.1e}")
