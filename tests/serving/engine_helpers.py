"""Helpers shared by the serving tests (engine, speculative, reference generate)."""

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Autouse in the modules that import it. Tiny models run hundreds of 1-token forwards: intra-op threads only add sync cost (40x on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_with_arrivals(engine, prompts, params, arrivals):
    """Add request i at step arrivals[i]; step until all finish. Returns ({request index: streamed tokens}, {id: index})."""
    streamed, ids, step = {}, {}, 0
    while len(ids) < len(prompts) or engine.has_unfinished():
        for i, arrival in enumerate(arrivals):
            if arrival == step:
                ids[engine.add_request(prompts[i], params[i])] = i
        for out in engine.step():
            streamed.setdefault(ids[out.request_id], []).extend(out.token_ids)
        step += 1
        assert step < 2000
    return streamed, ids


def assert_no_leak(engine):
    """Every block is free or cached with no reference, and no sequence is left in the block manager."""
    bm = engine.block_manager
    bm.check_invariants()
    assert not bm.seqs and bm.stats()["used_blocks"] == 0, bm.describe()
    assert all(b.ref_count == 0 for b in bm.blocks)
