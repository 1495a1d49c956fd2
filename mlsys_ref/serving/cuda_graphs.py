"""CUDA graphs for the engine's steps: pure-decode steps per batch size, steps with prefill chunks per token count.

Papers/practice: vLLM (Kwon et al. 2023, arXiv 2309.06180) and gpt-fast capture the decode step as CUDA
graphs, one per batch size, because a small model's step is launch-bound: a 135M model's 30 layers are
hundreds of kernels of a few microseconds each, and launching them from Python costs more than running
them. Sarathi-Serve (Agrawal et al. 2024, arXiv 2403.02310, §4.3) mixes prefill chunks into decode
batches; ``MixedGraphs`` captures those steps too, padded to a few token counts (vLLM v1's "piecewise"
graphs keep attention outside the graph instead; here the attention kernels take their bounds from
device tensors, so the whole step can be captured).

The one idea to notice: a graph replays fixed addresses, so every input lives in a persistent buffer
that the host *copies into* before ``replay()`` (one copy of a packed [rows, n] int64 tensor per step), and
the block tables stay on the device between steps (``PersistentBlockTables``): a sequence keeps its row
while it runs, the host rewrites a row only when that sequence's table changed (a new block every
``block_size`` tokens), and the graph gathers the batch's rows with one ``index_select``.

Left out: graphs for speculative verification (``spec_engine.VerifyGraphs``), multi-GPU, and capturing
the sampler.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from mlsys_ref.serving.model_runner import forward_unchecked, pack_chunks

__all__ = ["capture", "PersistentBlockTables", "DecodeGraphs", "MixedGraphs"]


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


class PersistentBlockTables:
    """Block tables on the device, one row per sequence (``rows`` of ``width`` int32), updated incrementally.

    ``assign(chunks, block_manager)`` returns each chunk's row index; a row is rewritten on the host mirror
    (and copied to the device) only when its sequence's table differs from what was last written (``written``)
    -- at batch 64 a decode step rewrites ~4 rows (a sequence needs a new block every ``block_size`` tokens). Rows of sequences that left the
    batch are reused when the free rows run out. Entries past a table's end are stale and never read."""

    def __init__(self, rows: int, width: int, device):
        self.host = torch.zeros(rows, width, dtype=torch.int32)
        self.device = torch.zeros(rows, width, dtype=torch.int32, device=device)
        self.width, self.row_of, self.written, self.free = width, {}, {}, list(range(rows - 1, -1, -1))

    def assign(self, chunks, block_manager) -> list[int]:
        rows, dirty = [], []
        for chunk in chunks:
            seq_id = chunk.seq.seq_id
            table = block_manager.block_table(seq_id)
            row = self.row_of.get(seq_id)
            if row is None:
                if not self.free:  # reclaim the rows of sequences not in this batch
                    current = {c.seq.seq_id for c in chunks}
                    for old in [s for s in self.row_of if s not in current]:
                        self.free.append(self.row_of.pop(old))
                        del self.written[old]
                row = self.row_of[seq_id] = self.free.pop()
            if self.written.get(seq_id) != table:
                self.host[row, :len(table)] = torch.tensor(table, dtype=torch.int32)
                self.written[seq_id] = table
                dirty.append(row)
            rows.append(row)
        if len(dirty) > 8:  # from pageable memory: the host may rewrite the mirror as soon as copy_ returns
            self.device.copy_(self.host, non_blocking=True)
        for row in dirty if len(dirty) <= 8 else ():
            self.device[row].copy_(self.host[row], non_blocking=True)
        return rows


class DecodeGraphs:
    """The pure-decode step captured as one CUDA graph per batch size; a batch of n runs in the smallest
    captured size >= n, its extra rows padded (slot -1: nothing written; context 1: a harmless read of
    whatever row they point at). Logits are read from the graph's own output tensor."""

    def __init__(self, runner, batch_sizes, max_blocks_per_seq: int, emulate: bool = False):
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
        # rows: tokens, positions, slot_mapping, context_lens, block-table row (int64; int32 copies in the graph)
        self.packed = torch.zeros(5, n, dtype=torch.int64, device=device)
        self.packed[2].fill_(-1)
        self.packed[3].fill_(1)
        self.tables = PersistentBlockTables(2 * n, max_blocks_per_seq, device)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.graphs, self.outputs, self.functions, pool = {}, {}, {}, None
        # the warm-up before the first capture also autotunes the kernels: give it long contexts (of block 0,
        # whatever it holds) rather than the padding's context 1, so the configs are chosen for real work
        self.packed[3].fill_(max_blocks_per_seq * runner.block_size)
        for b in reversed(sizes):  # largest first: the smaller graphs reuse its memory pool
            static = SimpleNamespace(tokens=self.packed[0, :b], positions=self.packed[1, :b],
                                     slot_mapping=self.packed[2, :b], context_lens=self.context_lens[:b])
            attend = runner.make_attend(static, decode_only=True)

            def run(static=static, attend=attend, b=b):
                self.context_lens[:b].copy_(self.packed[3, :b])  # inside the graph: int64 -> int32
                static.block_tables = self.tables.device.index_select(0, self.packed[4, :b])  # [b, width]
                return forward_unchecked(runner.model, static.tokens, static.positions, attend, *runner.halves)

            if emulate:
                self.functions[b] = run
                continue
            self.graphs[b], self.outputs[b] = capture(run, pool)  # outputs [b, vocab]
            pool = self.graphs[b].pool()
        self.packed[3].fill_(1)

    def can_run(self, chunks) -> bool:
        return (len(chunks) <= self.sizes[-1] and all(c.end - c.start == 1 for c in chunks)
                and all(-(-c.end // self.runner.block_size) <= self.width for c in chunks))

    def run(self, chunks, block_manager) -> torch.Tensor:
        n = len(chunks)
        b = next(size for size in self.sizes if size >= n)
        rows = [[0] * b, [0] * b, [-1] * b, [1] * b, [0] * b]  # padding rows: token 0, no write, context 1
        rows[4][:n] = self.tables.assign(chunks, block_manager)
        bs, written = block_manager.block_size, self.tables.written
        for i, chunk in enumerate(chunks):
            position, seq = chunk.start, chunk.seq
            rows[0][i], rows[1][i], rows[3][i] = seq.token_ids[position], position, chunk.end
            rows[2][i] = written[seq.seq_id][position // bs] * bs + position % bs  # its slot: where its K/V goes
        self.packed[:, :b].copy_(torch.tensor(rows), non_blocking=True)
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

    def __init__(self, runner, token_sizes, max_num_seqs: int, max_blocks_per_seq: int, emulate: bool = False):
        if runner.device.type != "cuda" and not emulate:
            raise ValueError(f"CUDA graphs need the model on a CUDA device, it is on {runner.device}")
        sizes = sorted({int(t) for t in token_sizes})
        if not sizes or sizes[0] < 1 or isinstance(max_num_seqs, bool) or max_num_seqs < 1:
            raise ValueError(f"token_sizes and max_num_seqs must be positive ints, got {token_sizes!r}, {max_num_seqs!r}")
        self.runner, self.sizes, self.width, self.max_seqs = runner, sizes, max_blocks_per_seq, max_num_seqs
        t, n, device = sizes[-1], max_num_seqs, runner.device
        self.packed = torch.zeros(3, t, dtype=torch.int64, device=device)  # tokens, positions, slot_mapping
        self.packed[2].fill_(-1)
        # per sequence: logits row (padded with 0), block-table row (int64); cu_seqlens_q [n+1], context_lens [n]
        self.per_seq = torch.zeros(2, n, dtype=torch.int64, device=device)
        self.seq_info = torch.zeros(2 * n + 1, dtype=torch.int32, device=device)
        self.tables = PersistentBlockTables(2 * n, max_blocks_per_seq, device)
        self.graphs, self.outputs, self.functions, pool = {}, {}, {}, None
        # warm-up (and autotuning) on a real shape: sequence 0 prefills min(T_b, its room) tokens, the rest none
        room = max_blocks_per_seq * runner.block_size
        for size in reversed(sizes):
            q = min(size, room)
            self.seq_info.copy_(torch.tensor([0] + [q] * n + [q] + [0] * (n - 1), dtype=torch.int32))
            static = SimpleNamespace(tokens=self.packed[0, :size], positions=self.packed[1, :size],
                                     slot_mapping=self.packed[2, :size], cu_seqlens_q=self.seq_info[:n + 1],
                                     context_lens=self.seq_info[n + 1:], max_q_len=size)
            attend = runner.make_attend(static, decode_only=False)

            def run(static=static, attend=attend):
                static.block_tables = self.tables.device.index_select(0, self.per_seq[1])  # [n, width]
                return forward_unchecked(runner.model, static.tokens, static.positions, attend, *runner.halves,
                                         logits_indices=self.per_seq[0])

            if emulate:
                self.functions[size] = run
                continue
            self.graphs[size], self.outputs[size] = capture(run, pool)  # outputs [max_num_seqs, vocab]
            pool = self.graphs[size].pool()
        self.seq_info.zero_()

    def can_run(self, chunks) -> bool:
        return (len(chunks) <= self.max_seqs and sum(c.end - c.start for c in chunks) <= self.sizes[-1]
                and all(-(-c.end // self.runner.block_size) <= self.width for c in chunks))

    def run(self, chunks, block_manager) -> torch.Tensor:
        tokens, positions, slots, _, cu, lens, sample_rows = pack_chunks(chunks, block_manager)
        t, n, pad = len(tokens), self.max_seqs, next(size for size in self.sizes if size >= len(tokens))
        extra, empty = pad - t, n - len(chunks)  # padding rows; sequences with no rows (q_len 0, context 0)
        self.packed[:, :pad].copy_(torch.tensor([tokens + [0] * extra, positions + [0] * extra, slots + [-1] * extra]),
                                   non_blocking=True)
        self.seq_info.copy_(torch.tensor(cu + [t] * empty + lens + [0] * empty, dtype=torch.int32), non_blocking=True)
        table_rows = self.tables.assign(chunks, block_manager)
        self.per_seq.copy_(torch.tensor([sample_rows + [0] * (n - len(sample_rows)), table_rows + [0] * empty]),
                           non_blocking=True)
        if self.functions:
            self.outputs[pad] = self.functions[pad]()
        else:
            self.graphs[pad].replay()
        return self.outputs[pad][:len(sample_rows)].clone()  # [R, vocab]


if __name__ == "__main__":
    from mlsys_ref.serving.engine import Engine
    from mlsys_ref.serving.generate import generate
    from mlsys_ref.serving.model import Llama, LlamaConfig
    from mlsys_ref.serving.sampling import SamplingParams

    # On a CPU the graphs are "emulated": the same persistent buffers, padding and block-table rows, run eagerly.
    model = Llama.random(LlamaConfig.tiny())
    engine = Engine(model, num_blocks=24, block_size=8, max_num_seqs=3, max_num_batched_tokens=16)
    emulate = engine.device.type != "cuda"
    engine.runner.capture_decode_graphs([1, 2, 4], max_blocks_per_seq=6, emulate=emulate)
    engine.runner.capture_mixed_graphs([8, 16], max_num_seqs=3, max_blocks_per_seq=6, emulate=emulate)
    prompts = [[(7 * i + j) % 97 for j in range(3 + 5 * i)] for i in range(4)]
    outputs = engine.generate(prompts, SamplingParams(max_tokens=9, ignore_eos=True), progress=False)
    same = all(o.output_ids == generate(model, p, 9, stop_token_ids=[]) for p, o in zip(prompts, outputs))
    kinds = ["decode" if all(c[3] == "decode" for c in r.chunks) else "with prefill" for r in engine.step_log]
    print(f"{'emulated' if emulate else 'captured'} graphs: {kinds.count('decode')} decode steps, "
          f"{kinds.count('with prefill')} steps with prefill chunks; outputs == reference generate(): {same}")
