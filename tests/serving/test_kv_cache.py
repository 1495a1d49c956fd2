"""BlockManager invariants (hypothesis: random allocate/append/free/truncate/fork/prefix sharing) and write_kv."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mlsys_ref.serving.kv_cache import BlockManager, allocate_kv_cache, copy_blocks, write_kv, write_kv_reference
from mlsys_ref.testing import assert_close


# ----------------------------------------------------------------------------- block manager, by hand
def test_prefix_hit_shares_full_blocks_and_leaves_one_token():
    manager = BlockManager(num_blocks=10, block_size=4)
    prompt = list(range(12))  # exactly 3 full blocks
    assert manager.allocate("a", prompt) == 0
    manager.mark_computed("a", 12)
    # same prompt: at most 2 blocks can be hits, the last token must be computed
    assert manager.allocate("b", prompt) == 8
    assert manager.block_table("b")[:2] == manager.block_table("a")[:2]
    assert manager.block_table("b")[2] != manager.block_table("a")[2]
    # a different second block breaks the chain: only the first block matches
    assert manager.allocate("c", prompt[:4] + [99] + prompt[5:]) == 4
    manager.check_invariants()
    assert manager.blocks[manager.block_table("a")[0]].ref_count == 3


def test_no_hit_before_mark_computed_and_without_prefix_caching():
    manager = BlockManager(num_blocks=10, block_size=4)
    manager.allocate("a", list(range(9)))
    assert manager.allocate("b", list(range(9))) == 0  # a's KV not written yet: no sharing
    off = BlockManager(num_blocks=10, block_size=4, enable_prefix_caching=False)
    off.allocate("a", list(range(9)))
    off.mark_computed("a", 9)
    assert off.allocate("b", list(range(9))) == 0


def test_freed_blocks_stay_cached_and_are_evicted_lru():
    manager = BlockManager(num_blocks=4, block_size=2)
    manager.allocate("a", [1, 2, 3])
    manager.mark_computed("a", 3)
    manager.free("a")
    stats = manager.stats()
    assert (stats["used_blocks"], stats["cached_blocks"], stats["free_blocks"]) == (0, 1, 3)
    assert manager.allocate("b", [1, 2, 9]) == 2  # revived from the cache
    manager.free("b")
    manager.allocate("c", [5, 6, 7, 8, 9, 10, 11, 12])  # needs all 4 blocks: evicts the cached one
    assert manager.stats()["cached_blocks"] == 0 and not manager.hash_to_block
    assert not manager.can_allocate([1])
    with pytest.raises(RuntimeError, match="not enough free blocks"):
        manager.allocate("d", [1])
    manager.check_invariants()


def test_fork_then_append_copies_on_write():
    manager = BlockManager(num_blocks=6, block_size=4)
    manager.allocate("p", [1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match="computed"):
        manager.fork("p", "c")
    manager.mark_computed("p", 5)
    manager.fork("p", "c")
    shared_last = manager.block_table("p")[1]
    assert manager.blocks[shared_last].ref_count == 2
    manager.append_slot("c", 6)
    assert manager.block_table("c")[1] != shared_last
    assert manager.copy_on_write_pending() == [(shared_last, manager.block_table("c")[1])]
    assert manager.copy_on_write_pending() == []  # cleared
    manager.append_slot("p", 7)  # p holds its last block alone now: no copy
    assert manager.copy_on_write_pending() == [] and manager.block_table("p")[1] == shared_last
    manager.check_invariants()


def test_truncate_frees_tail_and_a_write_unnames_the_block():
    manager = BlockManager(num_blocks=8, block_size=4)
    manager.allocate("a", list(range(11)))
    manager.mark_computed("a", 11)
    assert len(manager.hash_to_block) == 2
    manager.truncate("a", 6)
    assert len(manager.block_table("a")) == 2 and manager.num_tokens("a") == 6
    assert len(manager.hash_to_block) == 2  # block 1 still holds what its hash names...
    manager.append_slot("a", 42)
    assert len(manager.hash_to_block) == 1  # ...until a write changes it: then it is no cache entry
    assert manager.slot_mapping("a", 4, 6) == [manager.block_table("a")[1] * 4, manager.block_table("a")[1] * 4 + 1]
    manager.check_invariants()


def test_stats_count_wasted_slots_once_per_block():
    manager = BlockManager(num_blocks=8, block_size=4)
    manager.allocate("a", list(range(5)))  # 2 blocks, 3 slots wasted
    manager.mark_computed("a", 5)
    manager.fork("a", "b")  # shares them: still 3 wasted
    stats = manager.stats()
    assert (stats["used_blocks"], stats["used_slots"], stats["wasted_slots"]) == (2, 5, 3)
    assert "free list" in manager.describe() and "seq" in manager.describe()


def test_verbose_prints_decisions(capsys):
    manager = BlockManager(num_blocks=4, block_size=2, verbose=True)
    manager.allocate("a", [1, 2, 3])
    manager.free("a")
    printed = capsys.readouterr().out
    assert "allocate seq a" in printed and "free seq a" in printed


def test_bad_input_raises():
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(4, 0)
    manager = BlockManager(4, 4)
    with pytest.raises(ValueError, match="empty"):
        manager.allocate("a", [])
    manager.allocate("a", [1])
    with pytest.raises(ValueError, match="already"):
        manager.allocate("a", [1])
    with pytest.raises(KeyError, match="unknown"):
        manager.append_slot("zz", 1)
    with pytest.raises(ValueError, match="start"):
        manager.slot_mapping("a", 0, 2)
    with pytest.raises(ValueError, match="num_tokens"):
        manager.truncate("a", 5)


# ----------------------------------------------------------------------------- block manager, hypothesis
PREFIXES = [[7, 7, 7, 1, 2, 3, 4], [7, 7, 7, 1, 9], [5, 6]]  # shared prefixes make prefix hits likely

operation = st.one_of(
    st.tuples(st.just("allocate"), st.sampled_from(range(len(PREFIXES))), st.lists(st.integers(0, 3), max_size=6),
              st.integers(0, 8)),
    st.tuples(st.just("compute"), st.integers(0, 99)),
    st.tuples(st.just("append"), st.integers(0, 99), st.integers(0, 3)),
    st.tuples(st.just("free"), st.integers(0, 99)),
    st.tuples(st.just("truncate"), st.integers(0, 99), st.integers(0, 99)),
    st.tuples(st.just("fork"), st.integers(0, 99)),
)


@given(block_size=st.sampled_from([1, 2, 3, 4]), num_blocks=st.integers(3, 12), operations=st.lists(operation, max_size=40))
def test_block_manager_invariants(block_size, num_blocks, operations):
    """A fake cache holds the token id in each slot: every sequence must read back its own tokens."""
    manager = BlockManager(num_blocks, block_size)
    cache = np.full(num_blocks * block_size, -1)
    tokens: dict[int, list[int]] = {}  # what each live sequence should hold
    next_id = 0

    def write(seq_id, start, end):
        for position, slot in zip(range(start, end), manager.slot_mapping(seq_id, start, end)):
            assert manager.blocks[slot // block_size].ref_count == 1, "wrote into a shared block"
            cache[slot] = tokens[seq_id][position]
        manager.mark_computed(seq_id, end)

    for op in operations:
        live = sorted(tokens)
        seq_id = live[op[1] % len(live)] if live and op[0] != "allocate" else None
        if op[0] == "allocate":
            prompt = PREFIXES[op[1]] + op[2]
            if manager.can_allocate(prompt):
                tokens[next_id] = prompt
                cached = manager.allocate(next_id, prompt)
                assert cached % block_size == 0 and cached < len(prompt)
                write(next_id, cached, min(len(prompt), cached + op[3]))  # maybe only a first chunk
                next_id += 1
        elif seq_id is None:
            continue
        elif op[0] == "compute":
            write(seq_id, manager.seqs[seq_id].num_computed, len(tokens[seq_id]))
        elif op[0] == "append" and manager.seqs[seq_id].num_computed == len(tokens[seq_id]):
            if manager.can_append(seq_id):
                tokens[seq_id].append(op[2])
                manager.append_slot(seq_id, op[2])
                for src, dst in manager.copy_on_write_pending():
                    cache[dst * block_size:(dst + 1) * block_size] = cache[src * block_size:(src + 1) * block_size]
                write(seq_id, len(tokens[seq_id]) - 1, len(tokens[seq_id]))
        elif op[0] == "free":
            manager.free(seq_id)
            del tokens[seq_id]
        elif op[0] == "truncate":
            keep = op[2] % (len(tokens[seq_id]) + 1)
            manager.truncate(seq_id, keep)
            del tokens[seq_id][keep:]
        elif op[0] == "fork" and manager.seqs[seq_id].num_computed == len(tokens[seq_id]):
            manager.fork(seq_id, next_id)
            tokens[next_id] = list(tokens[seq_id])
            next_id += 1
        manager.check_invariants()
        stats = manager.stats()
        assert stats["used_blocks"] + stats["cached_blocks"] + stats["free_blocks"] == num_blocks
        for sid, expected in tokens.items():
            computed = manager.seqs[sid].num_computed
            assert manager.num_tokens(sid) == len(expected)
            assert cache[manager.slot_mapping(sid, 0, computed)].tolist() == expected[:computed], f"seq {sid} reads wrong KV"

    for sid in list(tokens):
        manager.free(sid)
    manager.check_invariants()
    assert all(b.ref_count == 0 for b in manager.blocks)
    assert manager.stats()["used_blocks"] == 0 and manager.stats()["wasted_slots"] == 0


# ----------------------------------------------------------------------------- write_kv
@pytest.mark.parametrize("block_size,heads,head_dim", [(4, 3, 24), (16, 2, 32)])
def test_write_kv_matches_reference(device, block_size, heads, head_dim):
    k_cache, v_cache = allocate_kv_cache(1, 7, block_size, heads, head_dim, torch.float32, device)[0]
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    slots = torch.randperm(7 * block_size, device=device)[:13]
    slots[[2, 9]] = -1  # padding tokens are skipped
    k, v = torch.randn(2, 13, heads, head_dim, device=device)
    write_kv(k_cache, v_cache, k, v, slots)
    write_kv_reference(k_ref, v_ref, k, v, slots)
    assert_close(k_cache, k_ref, name="k_cache")
    assert_close(v_cache, v_ref, name="v_cache")
    flat = k_cache.reshape(-1, heads, head_dim)
    assert_close(flat[slots[slots >= 0]], k[slots >= 0])  # round trip


def test_copy_blocks(device):
    k_cache, v_cache = (torch.randn(4, 2, 1, 3, device=device) for _ in range(2))
    before = k_cache.clone()
    copy_blocks(k_cache, v_cache, [(0, 3), (1, 2)])
    assert torch.equal(k_cache[3], before[0]) and torch.equal(k_cache[2], before[1])


def test_write_kv_bad_input(device):
    k_cache, v_cache = allocate_kv_cache(1, 2, 4, 2, 8, torch.float32, device)[0]
    k = torch.randn(3, 2, 8, device=device)
    with pytest.raises(ValueError, match="slot_mapping"):
        write_kv(k_cache, v_cache, k, k, torch.zeros(3, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="k and v"):
        write_kv(k_cache, v_cache, k[:, :1], k[:, :1], torch.zeros(3, dtype=torch.int64, device=device))
    with pytest.raises(TypeError, match="dtype"):
        write_kv(k_cache, v_cache, k.double(), k.double(), torch.zeros(3, dtype=torch.int64, device=device))


@pytest.mark.gpu
def test_write_kv_bf16_large():
    k_cache, v_cache = allocate_kv_cache(1, 256, 16, 8, 128, torch.bfloat16, "cuda")[0]
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    slots = torch.randperm(256 * 16, device="cuda")[:1000]
    k, v = torch.randn(2, 1000, 8, 128, device="cuda", dtype=torch.bfloat16)
    write_kv(k_cache, v_cache, k, v, slots)
    write_kv_reference(k_ref, v_ref, k, v, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
