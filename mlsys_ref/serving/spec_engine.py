"""Batched speculative decoding inside the continuous-batching engine (paged cache, any mix of requests).

Papers: Leviathan, Kalman & Matias 2023, arXiv:2211.17192, Algorithm 1 (the rule, one sequence);
Chen et al. 2023, arXiv:2302.01318, Algorithm 2; batching as in vLLM's speculative decoding and
Liu et al. 2024 ("Optimizing Speculative Decoding for Serving LLMs Using Goodput", arXiv:2406.14066 §2):
every running sequence drafts, all are verified in ONE packed target forward, and each keeps its own
number of accepted tokens.

One step of ``SpeculativeEngine``:
1. the ordinary scheduler picks the batch (decodes first, then prefill chunks; ``engine.py``);
2. every chunk that ends at its sequence's last token gets up to k drafts ``x_1..x_d`` from the drafter,
   and a KV slot for each in the paged cache (``BlockManager.append_slot``);
3. ONE forward over all chunks: a decoding sequence contributes d+1 query rows (q_len = d+1, bottom-right
   causal in the varlen paged attention), a prefill chunk its own rows; logits are kept for the last d+1
   rows of each sampling chunk;
4. per sequence, ``speculative.verify_greedy`` (all greedy sequences in one call, drafts padded with -1,
   which never matches) or ``speculative.verify`` with the request's own generator -> n accepted, token t;
5. rollback: ``BlockManager.truncate`` keeps context + the n accepted drafts (their K/V is right); the
   blocks past them go back to the free list. t has no K/V yet: it is the next step's first query row.

The one idea to notice: a draft is just more tokens with KV slots. The paged cache, the varlen kernel and
the scheduler need nothing new: a verify is a chunk of d+1 tokens, and a rejection is ``truncate``.

Drafters: ``NGramDrafter`` is shared by every sequence (it has no state). A ``ModelDrafter`` is a template:
each sequence gets its own ``ModelDrafter`` over the same weights with its own *contiguous* cache
(``drafters.py``), which rolls itself back by comparing its cached tokens with the context -- so
preemption, rejections and prefix-cache hits need no extra bookkeeping. Drafting runs sequence by
sequence (not batched): fine for n-gram and a few self-draft layers, the bottleneck for a large drafter.

CUDA graphs (``cuda_graph_batch_sizes``): a pure-verify step (every sequence decoding) has the fixed
shape [b sequences x (k+1) rows]; drafts shorter than k are padded with token 0 in real slots (their
logits are ignored, their blocks truncated like any rejected draft), so one graph per batch size serves
every step. Mixed steps (a prefill chunk in the batch) run eagerly.

Left out: top-k/top-p with speculation (they would have to be applied to p and q before the rule;
``add_request`` rejects them), tree drafts, batched drafting, adaptive k, drafts counted against the
scheduler's token budget (each decode counts as one token; drafts come on top).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from mlsys_ref.serving.drafters import ModelDrafter, NGramDrafter
from mlsys_ref.serving.engine import Engine, StepOutput
from mlsys_ref.serving.model_runner import StepInputs, forward_unchecked
from mlsys_ref.serving.sampling import SamplingParams, sample
from mlsys_ref.serving.scheduler import Chunk, Status
from mlsys_ref.serving.speculative import SpeculativeStats, verify, verify_greedy

__all__ = ["SpeculativeConfig", "SpeculativeEngine", "VerifyGraphs"]


@dataclass
class SpeculativeConfig:
    """``drafter``: an ``NGramDrafter`` or a ``ModelDrafter`` (a template: one copy per sequence); ``k`` drafts per step."""

    drafter: NGramDrafter | ModelDrafter
    k: int = 4

    def __post_init__(self) -> None:
        if not isinstance(self.drafter, (NGramDrafter, ModelDrafter)):
            raise TypeError(f"drafter must be an NGramDrafter or a ModelDrafter, got {type(self.drafter).__name__}")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or not 1 <= self.k <= 64:
            raise ValueError(f"k must be an int in [1, 64], got {self.k!r}")


class SpeculativeEngine(Engine):
    """``SpeculativeEngine(model, SpeculativeConfig(drafter, k), **Engine kwargs)``; ``stats`` counts every verify.

    ``cuda_graph_batch_sizes`` (CUDA) captures the verify step per batch size (``VerifyGraphs``);
    ``emulate_graphs=True`` runs the same fixed-shape buffers eagerly (CPU tests). ``verbose`` prints each verify."""

    def __init__(self, model, speculative: SpeculativeConfig, cuda_graph_batch_sizes=None, emulate_graphs: bool = False,
                 **engine_kwargs):
        if not isinstance(speculative, SpeculativeConfig):
            raise TypeError(f"speculative must be a SpeculativeConfig, got {type(speculative).__name__}")
        if speculative.drafter.vocab_size != model.config.vocab_size:
            raise ValueError(f"drafter vocab {speculative.drafter.vocab_size} != target vocab {model.config.vocab_size}")
        super().__init__(model, **engine_kwargs)  # no decode graphs: verify steps have k+1 rows per sequence
        self.spec, self.k = speculative, speculative.k
        self.drafters: dict[int, NGramDrafter | ModelDrafter] = {}
        self.stats = SpeculativeStats(histogram=[0] * (self.k + 1))
        self.verify_graphs = None
        if cuda_graph_batch_sizes:
            width = -(-(self.max_model_len + self.k + 1) // self.block_manager.block_size)
            with torch.no_grad():
                self.verify_graphs = VerifyGraphs(self.runner, cuda_graph_batch_sizes, self.k + 1, width, emulate_graphs)

    def add_request(self, prompt, params: SamplingParams | None = None) -> int:
        if isinstance(params, SamplingParams) and (params.top_k or params.top_p < 1.0):
            raise ValueError("speculative decoding supports greedy and temperature sampling only (top_k=0, top_p=1)")
        return super().add_request(prompt, params)

    def abort(self, request_id: int) -> bool:
        self.drafters.pop(request_id, None)
        return super().abort(request_id)

    def _drafter(self, seq):
        template = self.spec.drafter
        if isinstance(template, NGramDrafter):
            return template
        if seq.seq_id not in self.drafters:  # its own contiguous cache over the template's weights
            self.drafters[seq.seq_id] = ModelDrafter(template.model, template.num_layers,
                                                     self.max_model_len + self.k + 1, template.exit_head)
        return self.drafters[seq.seq_id]

    def _finish(self, seq, reason: str) -> None:
        seq.status, seq.finish_reason = Status.FINISHED, reason
        self.scheduler.running.remove(seq)
        self.block_manager.free(seq.seq_id)
        self.drafters.pop(seq.seq_id, None)

    # -- the loop
    @torch.no_grad()
    def step(self) -> list[StepOutput]:
        """Schedule, draft, ONE forward, verify per sequence, roll back. Returns the tokens produced per request."""
        outputs, batch, record = self._schedule_step()
        if not batch.chunks:
            return outputs
        bm = self.block_manager
        # -- 2. drafts, each with a reserved slot (fewer drafts if the cache runs out)
        drafts: dict[int, list[int]] = {}  # seq id -> draft tokens
        q_draft: dict[int, torch.Tensor | None] = {}  # seq id -> their distributions [d, vocab] (None when greedy)
        for chunk in batch.chunks:
            if chunk.sample:
                seq = chunk.seq
                room = min(self.k, seq.params.max_tokens - len(seq.output_ids) - 1, seq.max_len - len(seq.token_ids) - 1)
                tokens, q = self._drafter(seq).propose(seq.token_ids, room, seq.params.temperature,
                                                       seq.generator) if room > 0 else ([], None)
                drafts[seq.seq_id], q_draft[seq.seq_id] = list(tokens), q
        use_graph = (self.verify_graphs is not None and self.verify_graphs.fits(len(batch.chunks))
                     and all(c.sample and c.end - c.start == 1 for c in batch.chunks))
        for chunk in batch.chunks:
            if chunk.sample:
                seq_id, tokens = chunk.seq.seq_id, drafts[chunk.seq.seq_id]
                want, got = (self.k if use_graph else len(tokens)), 0  # graphs: pad to k with token 0 (ignored)
                while got < want and bm.can_append(seq_id):
                    bm.append_slot(seq_id, tokens[got] if got < len(tokens) else 0)
                    got += 1
                if got < want:  # out of blocks: fewer drafts, and an eager step
                    use_graph = False
                    del tokens[got:]
        # -- 3. one forward over everything; a sampling chunk is extended by its drafts (and padding)
        record.chunks = [(c.seq.seq_id, c.start, c.end, "decode" if c.is_decode else "prefill") for c in batch.chunks]
        self.runner.copy_blocks(bm.copy_on_write_pending())
        extended, rows, offset = [], [], 0
        for chunk in batch.chunks:
            seq = chunk.seq
            if not chunk.sample:
                extended.append(chunk)
                offset += chunk.end - chunk.start
                continue
            padded = bm.num_tokens(seq.seq_id) - len(seq.token_ids)  # drafts + padding with a slot
            tail = drafts[seq.seq_id] + [0] * (padded - len(drafts[seq.seq_id]))
            proxy = SimpleNamespace(seq_id=seq.seq_id, token_ids=seq.token_ids + tail)
            extended.append(Chunk(proxy, chunk.start, chunk.end + padded))
            offset += chunk.end + padded - chunk.start
            rows.append(range(offset - padded - 1, offset))  # the rows that predict t_1 .. t_{padded+1}
        if use_graph:
            logits = self.verify_graphs.run(extended, bm)  # [n * (k+1), vocab], every row
        else:
            inputs = StepInputs(extended, bm, self.device)
            inputs.logits_indices = torch.tensor([r for rs in rows for r in rs], dtype=torch.int64, device=self.device)
            attend = self.runner.make_attend(inputs, decode_only=inputs.all_decode)
            logits = self.model(inputs.tokens, inputs.positions, attend, inputs.logits_indices)
        # -- 4. verification; logits rows of sampling chunk i: starts[i] .. starts[i] + d_i
        sampling = [c.seq for c in batch.chunks if c.sample]
        starts, position = [], 0
        for rs in rows:
            starts.append(position)
            position += len(rs)
        accepted: dict[int, tuple[int, int]] = {}
        greedy = [i for i, s in enumerate(sampling) if s.params.greedy]
        if greedy:
            width = max(len(drafts[sampling[i].seq_id]) for i in greedy)
            index = torch.tensor([[starts[i] + min(j, len(drafts[sampling[i].seq_id])) for j in range(width + 1)]
                                  for i in greedy], device=logits.device)  # [G, width+1]
            x = torch.tensor([drafts[sampling[i].seq_id] + [-1] * (width - len(drafts[sampling[i].seq_id]))
                              for i in greedy], dtype=torch.long, device=logits.device)  # -1: never accepted
            n, t = verify_greedy(logits[index], x)
            for i, n_i, t_i in zip(greedy, n.tolist(), t.tolist()):
                accepted[sampling[i].seq_id] = (n_i, t_i)
        for i, seq in enumerate(sampling):
            if seq.params.greedy:
                continue
            d, temperature = len(drafts[seq.seq_id]), seq.params.temperature
            if d == 0:  # nothing drafted: an ordinary sampling step with the engine's sampler
                accepted[seq.seq_id] = (0, sample(logits[starts[i]:starts[i] + 1], [seq.params], [seq.generator])[0])
                continue
            p = torch.softmax(logits[starts[i]:starts[i] + d + 1] / temperature, dim=-1)  # [d+1, V]
            q = q_draft[seq.seq_id][:d].to(p)
            n, t = verify(p[None], q[None], torch.tensor([drafts[seq.seq_id]], device=p.device), seq.generator)
            accepted[seq.seq_id] = (int(n), int(t))
        # -- 5. roll back, advance, finish
        now = time.perf_counter()
        for chunk in batch.chunks:
            seq = chunk.seq
            if not chunk.sample:
                seq.num_computed = chunk.end
                bm.mark_computed(seq.seq_id, chunk.end)
                continue
            draft, (n, t) = drafts[seq.seq_id], accepted[seq.seq_id]
            kept = len(seq.token_ids) + n  # context + accepted drafts have the right K/V
            bm.truncate(seq.seq_id, kept)
            bm.mark_computed(seq.seq_id, kept)
            seq.num_computed = seq.num_slots = kept
            self.stats.steps += 1
            self.stats.drafted += len(draft)
            self.stats.accepted += n
            self.stats.histogram[n] += 1
            if self.verbose:
                print(f"  [spec] seq {seq.seq_id}: drafted {draft}, accepted {n}, then {t}")
            new = []
            for token in draft[:n] + [t]:
                seq.token_ids.append(token)
                new.append(token)
                if token in seq.stop_ids:
                    self._finish(seq, "stop")
                elif len(seq.output_ids) >= seq.params.max_tokens or len(seq.token_ids) >= seq.max_len:
                    self._finish(seq, "length")
                if seq.finish_reason is not None:
                    break
            self.stats.emitted += len(new)
            times = self.times[seq.seq_id]
            times[1] = now if times[1] is None else times[1]
            times[2] = now if seq.finish_reason is not None else None
            outputs.append(StepOutput(seq.seq_id, new, seq.finish_reason is not None))
        record.used_blocks = bm.num_blocks - len(bm.free_list) - len(bm.cached)
        return outputs


class VerifyGraphs:
    """The pure-verify step [b sequences x q_len rows] captured as one CUDA graph per batch size b (as
    ``cuda_graphs.DecodeGraphs`` does for q_len = 1). Padding sequences write nothing (slot -1) and
    attend to q_len stale positions of block 0. ``emulate`` runs the same buffers eagerly (CPU tests)."""

    def __init__(self, runner, batch_sizes, q_len: int, max_blocks_per_seq: int, emulate: bool = False):
        if runner.device.type != "cuda" and not emulate:
            raise ValueError(f"CUDA graphs need the model on a CUDA device, it is on {runner.device}")
        sizes = sorted({int(b) for b in batch_sizes})
        if not sizes or sizes[0] < 1:
            raise ValueError(f"batch_sizes must be positive ints, got {batch_sizes!r}")
        self.runner, self.sizes, self.q_len, self.width = runner, sizes, q_len, max_blocks_per_seq
        n, device = sizes[-1], runner.device
        self.packed = torch.zeros(3, n * q_len, dtype=torch.int64, device=device)  # tokens, positions, slots
        self.lens64 = torch.full((n,), q_len, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.context_lens = torch.full((n,), q_len, dtype=torch.int32, device=device)
        self.cu_seqlens_q = torch.arange(n + 1, dtype=torch.int32, device=device) * q_len
        self.graphs, self.outputs, self.functions, pool = {}, {}, {}, None
        for b in reversed(sizes):  # largest first: the smaller graphs reuse its memory pool
            rows = b * q_len
            static = SimpleNamespace(tokens=self.packed[0, :rows], positions=self.packed[1, :rows],
                                     slot_mapping=self.packed[2, :rows], block_tables=self.block_tables[:b],
                                     context_lens=self.context_lens[:b], cu_seqlens_q=self.cu_seqlens_q[:b + 1],
                                     max_q_len=q_len)
            attend = runner.make_attend(static, decode_only=False)

            def run(static=static, attend=attend, b=b):
                self.context_lens[:b].copy_(self.lens64[:b])  # inside the graph: int64 -> int32
                return forward_unchecked(runner.model, static.tokens, static.positions, attend)

            if emulate:
                self.functions[b] = run
                continue
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up: Triton compiles outside the capture
                for _ in range(2):
                    run()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[b] = run()  # [b * q_len, vocab]
            pool = graph.pool()
            self.graphs[b] = graph

    def fits(self, num_seqs: int) -> bool:
        return num_seqs <= self.sizes[-1]

    def run(self, chunks, block_manager) -> torch.Tensor:
        """Chunks of exactly q_len rows each -> logits [len(chunks) * q_len, vocab] (every row)."""
        n, q_len, bs = len(chunks), self.q_len, block_manager.block_size
        b = next(size for size in self.sizes if size >= n)
        tokens, positions, slots = [0] * (b * q_len), [0] * (b * q_len), [-1] * (b * q_len)
        lens, tables = [q_len] * b, []
        for i, chunk in enumerate(chunks):
            assert chunk.end - chunk.start == q_len
            table = block_manager.block_table(chunk.seq.seq_id)
            for j, p in enumerate(range(chunk.start, chunk.end)):
                tokens[i * q_len + j], positions[i * q_len + j] = chunk.seq.token_ids[p], p
                slots[i * q_len + j] = table[p // bs] * bs + p % bs
            lens[i] = chunk.end
            tables.append(table + [0] * (self.width - len(table)))
        self.packed[:, :b * q_len].copy_(torch.tensor([tokens, positions, slots]), non_blocking=True)
        self.lens64[:b].copy_(torch.tensor(lens), non_blocking=True)
        self.block_tables[:n].copy_(torch.tensor(tables, dtype=torch.int32), non_blocking=True)
        if self.functions:
            self.outputs[b] = self.functions[b]()
        else:
            self.graphs[b].replay()
        return self.outputs[b][:n * q_len].clone()


if __name__ == "__main__":
    from mlsys_ref.serving.generate import generate
    from mlsys_ref.serving.model import Llama, LlamaConfig

    target = Llama.random(LlamaConfig.tiny(), seed=0, std=0.3)
    prompts = [[5, 17, 42, 3, 88, 13, 7, 5, 17][: 4 + i] * 2 for i in range(5)]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    for name, drafter in [("n-gram", NGramDrafter(97)), ("self-draft (1 of 2 layers)", ModelDrafter(target, 1))]:
        engine = SpeculativeEngine(target, SpeculativeConfig(drafter, k=3), num_blocks=24, block_size=8, max_num_seqs=3,
                                   max_num_batched_tokens=32)
        outs = engine.generate(prompts, params, progress=False)
        same = all(o.output_ids == generate(target, p, 12, stop_token_ids=[]) for o, p in zip(outs, prompts))
        s = engine.stats
        print(f"{name:27s} batch 3, k 3: greedy == target-only generate(): {same}; acceptance {s.acceptance_rate:.2f}, "
              f"tokens/verify {s.tokens_per_step:.2f}, histogram {s.histogram}; "
              f"blocks in use after: {engine.block_manager.stats()['used_blocks']}")
