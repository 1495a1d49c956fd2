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

from types import SimpleNamespace

import torch

from mlsys_ref.serving.kv_cache import allocate_kv_cache, copy_blocks, write_kv

__all__ = ["ModelRunner", "StepInputs", "DecodeGraphs", "MixedGraphs", "pack_chunks", "forward_unchecked"]


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
        self._set_halves(compile)
        self.graphs = None
        self.graphs = DecodeGraphs(self, batch_sizes, max_blocks_per_seq, emulate)

    def capture_mixed_graphs(self, token_sizes, max_num_seqs: int, max_blocks_per_seq: int, emulate: bool = False,
                             compile: bool = False) -> None:
        """Capture steps with prefill chunks (up to ``max_num_seqs`` sequences, T padded to one of ``token_sizes``)."""
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


def capture(run, pool=None):
    """Warm ``run`` up on a side stream (Triton compiles and autotunes outside the capture), then capture it.
    Returns (graph, its output tensor); pass ``graph.pool()`` to the next capture to share memory."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(2):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool), torch.no_grad():
        output = run()
    return graph, output


class _StaticInputs:
    """Views of the graph's persistent input buffers for batch size ``b`` (what ``attend`` reads)."""

    def __init__(self, owner: "DecodeGraphs", b: int):
        self.tokens, self.positions, self.slot_mapping = owner.packed[0, :b], owner.packed[1, :b], owner.packed[2, :b]
        self.block_tables, self.context_lens = owner.block_tables[:b], owner.context_lens[:b]
        self.cu_seqlens_q = owner.cu_seqlens_q[: b + 1]


class DecodeGraphs:
    """The pure-decode step captured as one CUDA graph per batch size; a batch of n runs in the smallest
    captured size >= n, its extra rows padded (slot -1: nothing written; context 1: a harmless read).

    Every tensor the graph touches lives at a fixed address: new inputs are *copied into* these buffers
    before ``replay()``, and the logits are read from the graph's own output tensor. The host work per
    step is kept small (one copy for tokens/positions/slots/lengths, one for the block tables) because
    at batch 1 a 135M model's whole step is a couple of milliseconds."""

    def __init__(self, runner: ModelRunner, batch_sizes, max_blocks_per_seq: int, emulate: bool = False):
        # emulate=True: the same static buffers and padding, but run eagerly instead of capturing
        # (lets a CPU test check everything except the capture itself). The layer halves are the
        # runner's (torch.compile'd when capture_decode_graphs(compile=True)).
        if runner.device.type != "cuda" and not emulate:
            raise ValueError(f"CUDA graphs need the model on a CUDA device, it is on {runner.device}")
        sizes = sorted({int(b) for b in batch_sizes})
        if not sizes or sizes[0] < 1:
            raise ValueError(f"batch_sizes must be positive ints, got {batch_sizes!r}")
        self.runner, self.sizes, self.width = runner, sizes, max_blocks_per_seq
        n, device = sizes[-1], runner.device
        # rows: tokens, positions, slot_mapping, context_lens (int64 here, int32 copy below for the kernels)
        self.packed = torch.zeros(4, n, dtype=torch.int64, device=device)
        self.packed[2].fill_(-1)
        self.packed[3].fill_(1)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.cu_seqlens_q = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.graphs, self.outputs, self.functions = {}, {}, {}
        pool = None
        for b in reversed(sizes):  # largest first: the smaller graphs reuse its memory pool
            static = _StaticInputs(self, b)
            attend = runner.make_attend(static, decode_only=True)

            def run(static=static, attend=attend, b=b):
                self.context_lens[:b].copy_(self.packed[3, :b])  # inside the graph: int64 -> int32
                return forward_unchecked(runner.model, static.tokens, static.positions, attend, *runner.halves)

            if emulate:
                self.functions[b] = run
                continue
            self.graphs[b], self.outputs[b] = capture(run, pool)  # outputs [b, vocab]
            pool = self.graphs[b].pool()

    def can_run(self, chunks) -> bool:
        return (len(chunks) <= self.sizes[-1] and all(c.end - c.start == 1 for c in chunks)
                and all(-(-c.end // self.runner.block_size) <= self.width for c in chunks))

    def run(self, chunks, block_manager) -> torch.Tensor:
        n = len(chunks)
        b = next(size for size in self.sizes if size >= n)
        rows = [[0] * b, [0] * b, [-1] * b, [1] * b]  # padding rows: token 0, no write, context 1
        tables, bs = [], block_manager.block_size
        for i, chunk in enumerate(chunks):
            position, table = chunk.start, block_manager.block_table(chunk.seq.seq_id)
            rows[0][i], rows[1][i] = chunk.seq.token_ids[position], position
            rows[2][i] = table[position // bs] * bs + position % bs  # its slot
            rows[3][i] = chunk.end
            tables.append(table)
        width = max(len(t) for t in tables)
        self.packed[:, :b].copy_(torch.tensor(rows), non_blocking=True)
        # only the first ceil(context / block_size) entries of a row are read: stale ones beyond are harmless
        self.block_tables[:n, :width].copy_(torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
                                            non_blocking=True)
        if self.functions:
            self.outputs[b] = self.functions[b]()
        else:
            self.graphs[b].replay()
        sampled = [i for i, chunk in enumerate(chunks) if chunk.sample]
        logits = self.outputs[b]
        return logits[:n].clone() if len(sampled) == n else logits[sampled].clone()  # [R, vocab]


class MixedGraphs:
    """Steps with prefill chunks (Sarathi-Serve's mixed batches, or plain prefills) captured as one CUDA graph
    per padded token count T_b, each with room for ``max_num_seqs`` sequences. A step of T tokens from n
    sequences runs in the smallest T_b >= T: rows T.. are padding (token 0, slot -1: nothing written, and
    owned by no sequence, so the attention kernel never reads or writes them: their rows of every later
    matmul are garbage that stays in those rows); sequences n.. have q_len 0 and context 0 (no work).
    The attention grid is sized for the worst case (one sequence with all T_b rows): tiles past a
    sequence's q_len exit at once. Logits are computed for ``max_num_seqs`` rows (``logits_indices``
    padded with row 0); the first R are the sampled ones.

    Why: without it, every step that admits a request runs the ~30-layer forward eagerly, launch by launch
    (tens of host microseconds per kernel), and with hundreds of requests that is hundreds of slow steps."""

    def __init__(self, runner: ModelRunner, token_sizes, max_num_seqs: int, max_blocks_per_seq: int,
                 emulate: bool = False):
        if runner.device.type != "cuda" and not emulate:
            raise ValueError(f"CUDA graphs need the model on a CUDA device, it is on {runner.device}")
        sizes = sorted({int(t) for t in token_sizes})
        if not sizes or sizes[0] < 1 or isinstance(max_num_seqs, bool) or max_num_seqs < 1:
            raise ValueError(f"token_sizes and max_num_seqs must be positive ints, got {token_sizes!r}, {max_num_seqs!r}")
        self.runner, self.sizes, self.width, self.max_seqs = runner, sizes, max_blocks_per_seq, max_num_seqs
        t, n, device = sizes[-1], max_num_seqs, runner.device
        self.packed = torch.zeros(3, t, dtype=torch.int64, device=device)  # tokens, positions, slot_mapping
        self.packed[2].fill_(-1)
        self.seq_info = torch.zeros(2 * n + 1, dtype=torch.int32, device=device)  # cu_seqlens_q [n+1], context_lens [n]
        self.logits_indices = torch.zeros(n, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.graphs, self.outputs, self.functions, pool = {}, {}, {}, None
        for size in reversed(sizes):
            static = SimpleNamespace(tokens=self.packed[0, :size], positions=self.packed[1, :size],
                                     slot_mapping=self.packed[2, :size], cu_seqlens_q=self.seq_info[:n + 1],
                                     context_lens=self.seq_info[n + 1:], block_tables=self.block_tables, max_q_len=size)
            attend = runner.make_attend(static, decode_only=False)

            def run(static=static, attend=attend):
                return forward_unchecked(runner.model, static.tokens, static.positions, attend, *runner.halves,
                                         logits_indices=self.logits_indices)

            if emulate:
                self.functions[size] = run
                continue
            self.graphs[size], self.outputs[size] = capture(run, pool)  # outputs [max_num_seqs, vocab]
            pool = self.graphs[size].pool()

    def can_run(self, chunks) -> bool:
        return (len(chunks) <= self.max_seqs and sum(c.end - c.start for c in chunks) <= self.sizes[-1]
                and all(-(-c.end // self.runner.block_size) <= self.width for c in chunks))

    def run(self, chunks, block_manager) -> torch.Tensor:
        tokens, positions, slots, tables, cu, lens, sample_rows = pack_chunks(chunks, block_manager)
        t, n, pad = len(tokens), self.max_seqs, next(size for size in self.sizes if size >= len(tokens))
        extra = pad - t
        self.packed[:, :pad].copy_(torch.tensor([tokens + [0] * extra, positions + [0] * extra, slots + [-1] * extra]),
                                   non_blocking=True)
        empty = n - len(chunks)  # sequences with no rows: q_len 0, context 0
        self.seq_info.copy_(torch.tensor(cu + [t] * empty + lens + [0] * empty, dtype=torch.int32), non_blocking=True)
        self.logits_indices.copy_(torch.tensor(sample_rows + [0] * (n - len(sample_rows))), non_blocking=True)
        width = max(len(table) for table in tables)
        self.block_tables[:len(chunks), :width].copy_(padded_tables(tables, width), non_blocking=True)
        if self.functions:
            self.outputs[pad] = self.functions[pad]()
        else:
            self.graphs[pad].replay()
        return self.outputs[pad][:len(sample_rows)].clone()  # [R, vocab]


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
