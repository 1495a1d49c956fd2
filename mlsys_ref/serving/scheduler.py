"""Iteration-level scheduling with chunked prefill, block-aware admission and recompute preemption.

Papers: Orca (Yu et al. 2022, OSDI, §3.1 "iteration-level scheduling"): the batch is rebuilt at
every step, so a finished request leaves and a new one joins without waiting for the whole batch.
Sarathi-Serve (Agrawal et al. 2024, arXiv 2403.02310, §4.2-4.3 "stall-free batching" and chunked
prefill): each step has a *token budget*; decodes (one token each) go in first, then prefills
fill what is left, split into chunks, so a long prompt never stalls the running decodes.
vLLM (Kwon et al. 2023, arXiv 2309.06180, §4.5): a request is admitted only when its KV blocks
fit, and when the cache runs out the most recently arrived requests are preempted by *recompute*
(their blocks are freed; later their prompt *and generated tokens* are prefilled again).

The one idea to notice: a sequence is just ``token_ids`` and ``num_computed`` (how many of them
have K/V in the cache). Prefill, chunked prefill, decode and resume-after-preemption are all the
same step -- "compute tokens ``num_computed .. end``" -- and a token is sampled only when a chunk
reaches the end of ``token_ids``. So a preempted request resumes with the identical next token.

Left out: priorities other than first-come-first-served, swapping to CPU memory (vLLM's other
preemption mode), a watermark of reserved blocks, and speculative-decoding lookahead slots.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

import torch

from mlsys_ref.serving.sampling import SamplingParams

__all__ = ["Status", "Sequence", "Chunk", "Batch", "Scheduler"]


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One request's state. ``token_ids`` = prompt then outputs; ``num_computed`` of them are cached."""

    seq_id: int
    token_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None = None
    stop_ids: frozenset[int] = frozenset()
    max_len: int = 1 << 62  # the model's context: stop at this many tokens
    num_prompt_tokens: int = 0
    num_computed: int = 0
    num_slots: int = 0  # tokens with a KV slot reserved in the block manager
    num_cached_at_admission: int = 0  # prompt tokens found in the prefix cache (last admission)
    num_preemptions: int = 0
    status: Status = Status.WAITING
    finish_reason: str | None = None  # "stop", "length" or "abort"

    def __post_init__(self) -> None:
        self.num_prompt_tokens = len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed


@dataclass
class Chunk:
    """Compute ``seq.token_ids[start:end]`` this step; sample a token after it when ``sample``."""

    seq: Sequence
    start: int
    end: int

    @property
    def sample(self) -> bool:
        return self.end == len(self.seq.token_ids)

    @property
    def is_decode(self) -> bool:
        return self.end - self.start == 1 and self.start >= self.seq.num_prompt_tokens


@dataclass
class Batch:
    chunks: list[Chunk] = field(default_factory=list)
    preempted: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.end - c.start for c in self.chunks)


class Scheduler:
    """FCFS continuous batching over a ``BlockManager`` (kv_cache.py); ``verbose`` prints each decision."""

    def __init__(self, block_manager, max_num_seqs: int, max_num_batched_tokens: int, verbose: bool = False):
        for name, value in (("max_num_seqs", max_num_seqs), ("max_num_batched_tokens", max_num_batched_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.verbose = verbose
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest admission first: preemption takes from the end

    def _log(self, message: str) -> None:
        if self.verbose:
            print(f"  [scheduler] {message}")

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, seq: Sequence) -> None:
        """Drop a waiting or running sequence now; its blocks go back at once."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            self.block_manager.free(seq.seq_id)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        seq.status, seq.finish_reason = Status.FINISHED, "abort"
        self._log(f"abort seq {seq.seq_id}: blocks freed")

    def _preempt(self, seq: Sequence, batch: Batch) -> None:
        """Recompute preemption: free the blocks, keep the tokens, wait at the front of the queue."""
        self.running.remove(seq)
        self.block_manager.free(seq.seq_id)
        seq.num_computed = seq.num_slots = 0
        seq.num_preemptions += 1
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        batch.preempted.append(seq.seq_id)
        self._log(f"preempt seq {seq.seq_id} ({len(seq.token_ids)} tokens will be recomputed)")

    def schedule(self) -> Batch:
        """Build this step's batch: running decodes, then running prefills, then new admissions."""
        batch, budget = Batch(), self.max_num_batched_tokens
        chunks, bm, running = batch.chunks, self.block_manager, Status.RUNNING
        scheduled: set[int] = set()
        decodes, prefills = [], []
        for seq in self.running:  # one pass, no per-sequence property calls: this loop runs every step
            (decodes if len(seq.token_ids) - seq.num_computed == 1 else prefills).append(seq)
        for seq in decodes + prefills:
            if seq.status is not running:
                continue  # preempted earlier in this loop
            if budget == 0 or len(chunks) == self.max_num_seqs:
                break
            # -- room in the cache for the tokens that have no slot yet (the last sampled one)
            while seq.num_slots < len(seq.token_ids):
                if bm.can_append(seq.seq_id):
                    bm.append_slot(seq.seq_id, seq.token_ids[seq.num_slots])
                    seq.num_slots += 1
                    continue
                victim = self.running[-1]  # the most recent request; never one already scheduled
                assert victim.seq_id not in scheduled or victim is seq
                self._preempt(victim, batch)
                if victim is seq:
                    break
            if seq.status is not running:
                continue
            start = seq.num_computed
            end = start + min(len(seq.token_ids) - start, budget)
            chunks.append(Chunk(seq, start, end))
            scheduled.add(seq.seq_id)
            budget -= end - start
        # -- admit waiting requests in arrival order while their blocks and the budget allow
        while self.waiting and budget > 0 and len(batch.chunks) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.seq_id in batch.preempted:
                break  # just preempted for lack of blocks: do not thrash within one step
            if not self.block_manager.can_allocate(seq.token_ids):
                self._log(f"seq {seq.seq_id} waits: its {len(seq.token_ids)} tokens do not fit in the free blocks")
                break
            self.waiting.popleft()
            seq.num_computed = seq.num_cached_at_admission = self.block_manager.allocate(seq.seq_id, seq.token_ids)
            seq.num_slots = len(seq.token_ids)
            seq.status = Status.RUNNING
            self.running.append(seq)
            end = seq.num_computed + min(seq.num_uncomputed, budget)
            batch.chunks.append(Chunk(seq, seq.num_computed, end))
            budget -= end - seq.num_computed
            if self.verbose:
                self._log(f"admit seq {seq.seq_id}: {len(seq.token_ids)} tokens, {seq.num_computed} from the prefix cache")
        if self.verbose:
            parts = [f"{c.seq.seq_id}:{'decode' if c.is_decode else 'prefill'}[{c.start}:{c.end}]" for c in batch.chunks]
            self._log(f"batch {batch.num_tokens} tokens / {len(batch.chunks)} seqs: {' '.join(parts)}; "
                      f"waiting {[s.seq_id for s in self.waiting]}")
        return batch

    def postprocess(self, batch: Batch, sampled: dict[int, int]) -> list[tuple[Sequence, list[int], bool]]:
        """Advance ``num_computed``, append sampled tokens, finish sequences. Returns (seq, new tokens, finished)."""
        results = []
        for chunk in batch.chunks:
            seq = chunk.seq
            seq.num_computed = chunk.end
            if not chunk.sample:
                continue
            token = sampled[seq.seq_id]
            seq.token_ids.append(token)
            if token in seq.stop_ids:
                seq.finish_reason = "stop"
            elif len(seq.token_ids) - seq.num_prompt_tokens >= seq.params.max_tokens or len(seq.token_ids) >= seq.max_len:
                seq.finish_reason = "length"
            if seq.finish_reason is not None:
                seq.status = Status.FINISHED
                self.running.remove(seq)
                self.block_manager.free(seq.seq_id)
                if self.verbose:
                    self._log(f"seq {seq.seq_id} finished ({seq.finish_reason}), {len(seq.output_ids)} tokens")
            results.append((seq, [token], seq.finish_reason is not None))
        return results


if __name__ == "__main__":
    from mlsys_ref.serving.kv_cache import BlockManager

    # No model: the "next token" is a function of the sequence, so the printout shows only the decisions.
    manager = BlockManager(num_blocks=6, block_size=4)
    scheduler = Scheduler(manager, max_num_seqs=3, max_num_batched_tokens=8, verbose=True)
    seqs = [Sequence(i, [(5 * i + j) % 50 for j in range(n)], SamplingParams(max_tokens=m))
            for i, (n, m) in enumerate([(5, 10), (6, 10), (13, 3), (5, 5)])]
    for seq in seqs:
        scheduler.add(seq)
    step = 0
    while scheduler.has_unfinished():
        print(f"step {step}")
        batch = scheduler.schedule()
        for chunk in batch.chunks:
            manager.mark_computed(chunk.seq.seq_id, chunk.end)
        scheduler.postprocess(batch, {c.seq.seq_id: (sum(c.seq.token_ids) % 50) for c in batch.chunks if c.sample})
        step += 1
    print(f"all finished in {step} steps; preemptions {[s.num_preemptions for s in seqs]}; "
          f"blocks in use: {manager.stats()['used_blocks']}")
