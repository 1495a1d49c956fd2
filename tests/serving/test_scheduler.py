"""Scheduler without a model: budgets, decode-first order, chunked prefill, admission, preemption, abort.

A fake "model" picks each next token as a function of the sequence's tokens, so the outputs of a
run with preemptions can be compared to a run without them.
"""

import pytest

from mlsys_ref.serving.kv_cache import BlockManager
from mlsys_ref.serving.sampling import SamplingParams
from mlsys_ref.serving.scheduler import Scheduler, Sequence, Status


def fake_next_token(seq: Sequence) -> int:
    return (sum(seq.token_ids) * 31 + len(seq.token_ids)) % 97


def run(scheduler: Scheduler, seqs, arrivals=None, max_steps=500, on_batch=None):
    """Drive the scheduler to completion; returns the batches. ``arrivals[i]`` = step seq i arrives."""
    arrivals = arrivals or [0] * len(seqs)
    batches = []
    for step in range(max_steps):
        for seq, arrival in zip(seqs, arrivals):
            if arrival == step:
                scheduler.add(seq)
        if not scheduler.has_unfinished() and step > max(arrivals):
            return batches
        batch = scheduler.schedule()
        if on_batch:
            on_batch(step, batch)
        batches.append(batch)
        sampled = {c.seq.seq_id: fake_next_token(c.seq) for c in batch.chunks if c.sample}
        for c in batch.chunks:
            scheduler.block_manager.mark_computed(c.seq.seq_id, c.end)
        scheduler.postprocess(batch, sampled)
        scheduler.block_manager.check_invariants()
    raise AssertionError("scheduler did not finish")


def make_seqs(lengths, max_tokens):
    return [Sequence(i, [(7 * i + j) % 97 for j in range(n)], SamplingParams(max_tokens=m)) for i, (n, m) in enumerate(zip(lengths, max_tokens))]


def test_budget_seq_limit_and_decode_first():
    bm = BlockManager(64, 4)
    scheduler = Scheduler(bm, max_num_seqs=3, max_num_batched_tokens=10)
    seqs = make_seqs([13, 5, 22, 3, 9], [6, 9, 4, 7, 5])

    def check(step, batch):
        assert batch.num_tokens <= 10 and len(batch.chunks) <= 3
        kinds = [c.end - c.start == 1 and c.start >= c.seq.num_prompt_tokens for c in batch.chunks]
        assert kinds == sorted(kinds, reverse=True), "decodes must come before prefill chunks"

    batches = run(scheduler, seqs, on_batch=check)
    assert all(s.status is Status.FINISHED and len(s.output_ids) == s.params.max_tokens for s in seqs)
    chunks_of_seq2 = [(c.start, c.end) for b in batches for c in b.chunks if c.seq.seq_id == 2 and c.start < 22]
    assert len(chunks_of_seq2) > 1 and chunks_of_seq2[-1][1] == 22, "the 22-token prompt is prefilled in chunks"
    assert bm.stats()["used_blocks"] == 0


def test_first_come_first_served_admission_waits_for_blocks():
    bm = BlockManager(6, 4, enable_prefix_caching=False)
    scheduler = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    big, small = make_seqs([16, 2], [3, 3])
    first = Sequence(9, list(range(12)), SamplingParams(max_tokens=2))
    scheduler.add(first)
    scheduler.add(big)
    scheduler.add(small)
    batch = scheduler.schedule()
    # `first` takes 3 of 6 blocks; `big` needs 4 and waits, and `small` (which would fit) waits behind it
    assert [c.seq.seq_id for c in batch.chunks] == [9]
    assert [s.seq_id for s in scheduler.waiting] == [0, 1]


def test_preemption_recomputes_and_keeps_outputs():
    lengths, max_tokens = [9, 14, 6, 11], [12, 8, 15, 10]
    roomy = make_seqs(lengths, max_tokens)
    run(Scheduler(BlockManager(64, 4), 4, 32), roomy)
    tight = make_seqs(lengths, max_tokens)
    bm = BlockManager(8, 4)
    preempted = []
    batches = run(Scheduler(bm, 4, 32), tight, on_batch=lambda step, b: preempted.extend(b.preempted))
    assert preempted, "8 blocks of 4 slots cannot hold these four sequences at once"
    assert [s.output_ids for s in tight] == [s.output_ids for s in roomy]
    assert sum(s.num_preemptions for s in tight) == len(preempted)
    assert bm.stats()["used_blocks"] == 0
    # the victim is always the most recently admitted running sequence
    assert all(b.preempted == sorted(b.preempted, reverse=True) for b in batches)


def test_abort_frees_blocks_at_once():
    bm = BlockManager(16, 4)
    scheduler = Scheduler(bm, 4, 64)
    a, b = make_seqs([10, 7], [50, 50])
    scheduler.add(a)
    scheduler.add(b)
    batch = scheduler.schedule()
    used = bm.stats()["used_blocks"]
    scheduler.abort(a)
    assert bm.stats()["used_blocks"] == used - 3 and a.finish_reason == "abort" and a.status is Status.FINISHED
    waiting = Sequence(5, [1, 2, 3], SamplingParams())
    scheduler.add(waiting)
    scheduler.abort(waiting)
    assert waiting not in scheduler.waiting
    assert [c.seq for c in batch.chunks] == [a, b] and scheduler.running == [b]


def test_verbose_prints_decisions(capsys):
    scheduler = Scheduler(BlockManager(8, 4), 2, 8, verbose=True)
    run(scheduler, make_seqs([6, 3], [2, 2]))
    out = capsys.readouterr().out
    assert "admit seq 0" in out and "prefill[0:6]" in out and "finished (length)" in out


@pytest.mark.parametrize("kwargs", [dict(max_num_seqs=0), dict(max_num_batched_tokens=0), dict(max_num_seqs=1.5)])
def test_invalid_limits_raise(kwargs):
    args = dict(max_num_seqs=2, max_num_batched_tokens=8) | kwargs
    with pytest.raises(ValueError):
        Scheduler(BlockManager(4, 4), **args)
