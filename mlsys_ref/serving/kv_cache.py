"""Paged KV cache: a block allocator with prefix caching, and the Triton kernel that writes K/V into slots.

Kwon et al. 2023, "Efficient Memory Management for Large Language Model Serving with PagedAttention"
(vLLM), arXiv 2309.06180: §4.2 (logical blocks map to physical blocks through a per-sequence *block
table*, allocated on demand from a free list), §4.3-4.4 (reference counts, copy-on-write, shared
prefixes). Prefix caching as in vLLM's automatic prefix caching: a *full* block is named by a hash of
its tokens and of the previous block's hash (a chain); blocks no request holds stay cached and are
evicted least-recently-used. Cache per layer: ``[num_blocks, block_size, Hkv, D]``; the slot of
(sequence, position) is ``block_table[position // block_size] * block_size + position % block_size``.

The one idea to notice: memory is handed out a block at a time, so a sequence wastes at most
``block_size - 1`` slots, not everything up to the maximum length. Left out: swapping to CPU (§4.5;
we preempt by recompute), beam search, hash salts, sliding-window freeing.

Engine protocol: ``allocate`` a prompt (returns how many leading tokens are cached), ``append_slot``
before each new token, apply ``copy_on_write_pending()`` to every layer with ``copy_blocks``,
``write_kv`` the step's K/V at ``slot_mapping`` slots, then ``mark_computed(seq_id, n)`` once KV of the
first ``n`` positions is written: only then are full blocks registered for sharing (a hit must never
read KV that a chunked prefill has not yet written).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

import torch

from mlsys_ref.backend import check_kernel_device, require_triton, tl, triton

__all__ = ["Block", "BlockManager", "write_kv", "write_kv_reference", "copy_blocks", "allocate_kv_cache"]


# ----------------------------------------------------------------------------- Triton kernel
@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kc_block, stride_kc_slot, stride_kc_head,
    stride_vc_block, stride_vc_slot, stride_vc_head,
    num_heads, head_dim, block_size,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # one program per token: copy its [Hkv, D] keys and values into its slot
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)  # -1 = padding token, nothing to write
    block = slot // block_size
    offset = slot % block_size
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    # a padding token writes no head (a scalar bool & a block mask trips the interpreter, so fold it in)
    heads_to_write = tl.where(slot >= 0, num_heads, 0)
    mask = (heads < heads_to_write) & (dims < head_dim)
    k = tl.load(k_ptr + token * stride_kt + heads * stride_kh + dims, mask=mask)
    v = tl.load(v_ptr + token * stride_vt + heads * stride_vh + dims, mask=mask)
    k_dst = k_cache_ptr + block * stride_kc_block + offset * stride_kc_slot + heads * stride_kc_head + dims
    v_dst = v_cache_ptr + block * stride_vc_block + offset * stride_vc_slot + heads * stride_vc_head + dims
    tl.store(k_dst, k, mask=mask)
    tl.store(v_dst, v, mask=mask)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write ``k``, ``v`` ``[T, Hkv, D]`` into ``k_cache``/``v_cache`` ``[num_blocks, block_size, Hkv, D]``
    at ``slot_mapping`` ``[T]`` (int64; -1 = skip that token), in place."""
    require_triton("write_kv")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"k_cache/v_cache must both be [num_blocks, block_size, Hkv, D] of one dtype, got "
                         f"{tuple(k_cache.shape)} {k_cache.dtype} and {tuple(v_cache.shape)} {v_cache.dtype}")
    _, block_size, num_heads, head_dim = k_cache.shape
    if k.dim() != 3 or tuple(k.shape[1:]) != (num_heads, head_dim) or v.shape != k.shape:
        raise ValueError(f"k and v must be [T, {num_heads}, {head_dim}] to match the cache, got {tuple(k.shape)}, {tuple(v.shape)}")
    if k.dtype != k_cache.dtype or v.dtype != k_cache.dtype:
        raise TypeError(f"k/v dtypes {k.dtype}/{v.dtype} must equal the cache's {k_cache.dtype}")
    if slot_mapping.dtype != torch.int64 or slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"slot_mapping must be int64 of shape [{k.shape[0]}], got {slot_mapping.dtype} {tuple(slot_mapping.shape)}")
    for name, tensor in (("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v), ("slot_mapping", slot_mapping)):
        check_kernel_device(tensor, name)
        if tensor.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride in its last dimension")
    if k.shape[0] == 0:
        return
    _write_kv_kernel[(k.shape[0],)](
        k, v, k_cache, v_cache, slot_mapping, *k.stride()[:2], *v.stride()[:2],
        *k_cache.stride()[:3], *v_cache.stride()[:3], num_heads, head_dim, block_size,
        BLOCK_H=triton.next_power_of_2(num_heads), BLOCK_D=triton.next_power_of_2(head_dim),
    )


def write_kv_reference(k_cache, v_cache, k, v, slot_mapping) -> None:
    """The same as :func:`write_kv` with PyTorch indexing (the reference tests compare against)."""
    keep = slot_mapping >= 0
    blocks, rows = slot_mapping[keep] // k_cache.shape[1], slot_mapping[keep] % k_cache.shape[1]
    k_cache[blocks, rows], v_cache[blocks, rows] = k[keep], v[keep]


def copy_blocks(k_cache: torch.Tensor, v_cache: torch.Tensor, pairs: Sequence[tuple[int, int]]) -> None:
    """Copy-on-write on the tensors: for each ``(src, dst)`` physical block pair, ``cache[dst] = cache[src]``."""
    if not pairs:
        return
    src, dst = torch.tensor(list(pairs), device=k_cache.device).T
    k_cache[dst] = k_cache[src]
    v_cache[dst] = v_cache[src]


def allocate_kv_cache(num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, device):
    """Per-layer ``(k_cache, v_cache)`` pairs, zero-filled, ``[num_blocks, block_size, Hkv, D]`` each."""
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return [tuple(torch.zeros(shape, dtype=dtype, device=device) for _ in range(2)) for _ in range(num_layers)]


# ----------------------------------------------------------------------------- block manager
@dataclass
class Block:
    """A physical block: how many block tables hold it, and its prefix hash once full and computed."""
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set only for full blocks whose KV is computed; then the block is immutable
    token_ids: tuple[int, ...] = ()  # the tokens the hash names (checked on a hit: hashes can collide)


@dataclass
class _Sequence:
    block_table: list[int] = field(default_factory=list)  # logical block -> physical block
    token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # positions [0, num_computed) have their KV in the cache
    hashes: list[int] = field(default_factory=list)  # hash chain of the full computed blocks so far


def block_hash(token_ids: Sequence[int], prefix_hash: int | None) -> int:
    """Hash chain: a full block's name depends on its tokens *and* on everything before it."""
    return hash((prefix_hash if prefix_hash is not None else -1, tuple(token_ids)))


class BlockManager:
    """Free list, reference counts, block tables and prefix cache of ``num_blocks`` blocks of ``block_size`` slots.

    Every block is in exactly one state: *free* (ref 0, no hash, in ``free_list``), *cached* (ref 0, a
    hash, in the LRU ``cached`` dict: reusable by a prefix hit, evictable), or *used* (ref > 0).
    ``verbose=True`` prints each decision; ``describe()`` returns the tables and lists as text.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, verbose: bool = False):
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching, self.verbose = enable_prefix_caching, verbose
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_list = list(range(num_blocks - 1, -1, -1))  # pop() hands out block 0 first
        self.cached: OrderedDict[int, None] = OrderedDict()  # ref-0 hashed blocks, least recently used first
        self.hash_to_block: dict[int, int] = {}
        self.seqs: dict[object, _Sequence] = {}
        self._pending_copies: list[tuple[int, int]] = []
        self.prefix_hits = self.prefix_queries = 0  # in blocks, for the hit rate

    def _log(self, message: str) -> None:
        if self.verbose:
            print(f"[kv] {message}")

    def _num_available(self) -> int:  # free blocks plus evictable cached ones
        return len(self.free_list) + len(self.cached)

    def _take_block(self) -> int:
        if self.free_list:
            block_id = self.free_list.pop()
        elif self.cached:
            block_id, _ = self.cached.popitem(last=False)  # evict the least recently used cached block
            self._log(f"evict cached block {block_id}")
            self._unname(self.blocks[block_id])
        else:
            raise RuntimeError("out of KV blocks: check can_allocate/can_append first (or preempt)")
        self.blocks[block_id].ref_count = 1
        return block_id

    def _unname(self, block: Block) -> None:
        del self.hash_to_block[block.hash]
        block.hash, block.token_ids = None, ()

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        assert block.ref_count >= 0, f"block {block_id} released more often than held"
        if block.ref_count == 0:
            if block.hash is not None:
                self.cached[block_id] = None  # most recently used end
            else:
                self.free_list.append(block_id)

    def _prefix_hits(self, token_ids: Sequence[int]) -> list[int]:
        """Physical blocks holding the longest cached prefix (full blocks, leaving >= 1 token to compute)."""
        hits, prefix_hash = [], None
        for i in range((len(token_ids) - 1) // self.block_size if self.enable_prefix_caching else 0):
            tokens = tuple(token_ids[i * self.block_size:(i + 1) * self.block_size])
            prefix_hash = block_hash(tokens, prefix_hash)
            block_id = self.hash_to_block.get(prefix_hash)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            hits.append(block_id)
        return hits

    def _seq(self, seq_id) -> _Sequence:
        if seq_id not in self.seqs:
            raise KeyError(f"unknown seq_id {seq_id!r}")
        return self.seqs[seq_id]

    # -- public API
    def can_allocate(self, token_ids: Sequence[int]) -> bool:
        """Whether ``allocate`` would find blocks for this whole prompt (prefix hits count as found)."""
        hits = self._prefix_hits(token_ids)
        needed = -(-len(token_ids) // self.block_size) - len(hits)
        reused_from_cache = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        return needed <= self._num_available() - reused_from_cache

    def allocate(self, seq_id, token_ids: Sequence[int]) -> int:
        """Build the block table of a new sequence for its whole prompt.

        Returns how many leading prompt tokens are already in the cache (a prefix hit): a multiple
        of ``block_size``, strictly less than ``len(token_ids)``. Their KV needs no computing.
        """
        if seq_id in self.seqs:
            raise ValueError(f"seq_id {seq_id!r} is already allocated")
        if len(token_ids) == 0:
            raise ValueError("token_ids must not be empty")
        if not self.can_allocate(token_ids):
            raise RuntimeError(f"not enough free blocks for {len(token_ids)} tokens: check can_allocate first")
        hits = self._prefix_hits(token_ids)
        for block_id in hits:
            if self.blocks[block_id].ref_count == 0:
                del self.cached[block_id]  # revived: no longer evictable
            self.blocks[block_id].ref_count += 1
        table = list(hits)
        while len(table) * self.block_size < len(token_ids):
            table.append(self._take_block())
        num_cached = len(hits) * self.block_size
        self.prefix_queries += (len(token_ids) - 1) // self.block_size
        self.prefix_hits += len(hits)
        self.seqs[seq_id] = _Sequence(table, list(token_ids), num_cached, [self.blocks[b].hash for b in hits])
        self._log(f"allocate seq {seq_id}: {len(token_ids)} tokens, {len(hits)} cached blocks, table {table}")
        return num_cached

    def can_append(self, seq_id) -> bool:
        """Whether one more token fits: a fresh block or a copy-on-write copy, if needed, is available."""
        seq = self._seq(seq_id)
        index = len(seq.token_ids) // self.block_size
        needs_block = index == len(seq.block_table) or self.blocks[seq.block_table[index]].ref_count > 1
        return not needs_block or self._num_available() >= 1

    def append_slot(self, seq_id, token_id: int) -> None:
        """Make room for one more token at position ``num_tokens(seq_id)``: a new block when the last
        is full, or copy-on-write when the last block is shared (see ``copy_on_write_pending``)."""
        seq = self._seq(seq_id)
        index = len(seq.token_ids) // self.block_size
        if index == len(seq.block_table):
            seq.block_table.append(self._take_block())
        else:
            old = seq.block_table[index]
            if self.blocks[old].ref_count > 1:  # shared: never write into it, copy it
                new = self._take_block()
                self._release(old)
                seq.block_table[index] = new
                self._pending_copies.append((old, new))
                self._log(f"copy-on-write seq {seq_id}: block {old} -> {new}")
            elif self.blocks[old].hash is not None:  # ours alone, named (after a truncate), about to change
                self._unname(self.blocks[old])
        seq.token_ids.append(int(token_id))

    def copy_on_write_pending(self) -> list[tuple[int, int]]:
        """The ``(src, dst)`` block copies owed since the last call (do them with ``copy_blocks``
        on every layer's cache before this step's ``write_kv``); the list is cleared."""
        pending, self._pending_copies = self._pending_copies, []
        return pending

    def mark_computed(self, seq_id, num_tokens: int) -> None:
        """The KV of positions ``[0, num_tokens)`` is now in the cache: register its full blocks' hashes."""
        seq = self._seq(seq_id)
        if not 0 <= num_tokens <= len(seq.token_ids):
            raise ValueError(f"num_tokens must be in [0, {len(seq.token_ids)}], got {num_tokens}")
        seq.num_computed = max(seq.num_computed, num_tokens)
        if not self.enable_prefix_caching:
            return
        while len(seq.hashes) < seq.num_computed // self.block_size:  # extend the hash chain
            i = len(seq.hashes)
            tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            seq.hashes.append(block_hash(tokens, seq.hashes[-1] if seq.hashes else None))
            block = self.blocks[seq.block_table[i]]
            if block.hash is None and seq.hashes[-1] not in self.hash_to_block:
                block.hash, block.token_ids = seq.hashes[-1], tokens
                self.hash_to_block[block.hash] = block.block_id

    def block_table(self, seq_id) -> list[int]:
        """Logical block -> physical block of this sequence (a copy)."""
        return list(self._seq(seq_id).block_table)

    def num_tokens(self, seq_id) -> int:  # tokens with a slot, computed or not
        return len(self._seq(seq_id).token_ids)

    def slot_mapping(self, seq_id, start: int, end: int) -> list[int]:
        """Physical slots of positions ``start..end-1`` (``end <= num_tokens``)."""
        seq = self._seq(seq_id)
        if not 0 <= start <= end <= len(seq.token_ids):
            raise ValueError(f"need 0 <= start <= end <= {len(seq.token_ids)}, got start={start}, end={end}")
        bs = self.block_size
        return [seq.block_table[p // bs] * bs + p % bs for p in range(start, end)]

    def free(self, seq_id) -> None:
        """Release every block of the sequence; hashed blocks stay cached (tail first, so evicted first)."""
        seq = self._seq(seq_id)
        del self.seqs[seq_id]
        for block_id in reversed(seq.block_table):
            self._release(block_id)
        self._log(f"free seq {seq_id}: {len(seq.block_table)} blocks")

    def truncate(self, seq_id, num_tokens: int) -> None:
        """Keep only the first ``num_tokens`` tokens (speculative-decoding rollback); frees blocks past them."""
        seq = self._seq(seq_id)
        if not 0 <= num_tokens <= len(seq.token_ids):
            raise ValueError(f"num_tokens must be in [0, {len(seq.token_ids)}], got {num_tokens}")
        keep = -(-num_tokens // self.block_size)
        for block_id in reversed(seq.block_table[keep:]):
            self._release(block_id)
        del seq.block_table[keep:], seq.token_ids[num_tokens:]
        seq.num_computed = min(seq.num_computed, num_tokens)
        del seq.hashes[num_tokens // self.block_size:]  # full blocks before num_tokens keep their names
        self._log(f"truncate seq {seq_id} to {num_tokens} tokens")

    def fork(self, parent_id, child_id) -> None:
        """The child shares all of the parent's blocks (parallel sampling, §4.4); writes then copy-on-write."""
        parent = self._seq(parent_id)
        if child_id in self.seqs:
            raise ValueError(f"seq_id {child_id!r} is already allocated")
        if parent.num_computed < len(parent.token_ids):  # else both would write the same shared slots
            raise ValueError(f"fork {parent_id!r} only once its KV is computed (mark_computed)")
        for block_id in parent.block_table:
            self.blocks[block_id].ref_count += 1
        self.seqs[child_id] = _Sequence(list(parent.block_table), list(parent.token_ids), parent.num_computed, list(parent.hashes))

    def stats(self) -> dict[str, float]:
        """Blocks used/cached/free, and slots: ``used_slots`` hold a token, ``wasted_slots`` are allocated but empty."""
        fill = {}
        for seq in self.seqs.values():
            for i, block_id in enumerate(seq.block_table):
                in_block = min(self.block_size, len(seq.token_ids) - i * self.block_size)
                fill[block_id] = max(fill.get(block_id, 0), in_block)
        used_blocks = sum(1 for b in self.blocks if b.ref_count > 0)
        used_slots = sum(fill.values())
        return {
            "used_blocks": used_blocks, "cached_blocks": len(self.cached), "free_blocks": len(self.free_list),
            "used_slots": used_slots, "wasted_slots": used_blocks * self.block_size - used_slots,
            "cached_slots": len(self.cached) * self.block_size, "free_slots": len(self.free_list) * self.block_size,
            "prefix_hit_rate": self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0,
        }

    def check_invariants(self) -> None:
        """Assert the bookkeeping is consistent (tests call this after every operation)."""
        holders = [0] * self.num_blocks
        for seq in self.seqs.values():
            assert len(seq.block_table) == -(-len(seq.token_ids) // self.block_size), "table length != tokens"
            for block_id in seq.block_table:
                holders[block_id] += 1
        free, cached = set(self.free_list), set(self.cached)
        assert len(free) == len(self.free_list) and not free & cached, "a block is listed twice"
        for b in self.blocks:
            assert b.ref_count == holders[b.block_id], f"block {b.block_id}: ref {b.ref_count}, {holders[b.block_id]} tables"
            assert (b.block_id in free) == (b.ref_count == 0 and b.hash is None), f"block {b.block_id} free state"
            assert (b.block_id in cached) == (b.ref_count == 0 and b.hash is not None), f"block {b.block_id} cache state"
            assert b.hash is None or self.hash_to_block.get(b.hash) == b.block_id, f"block {b.block_id} not indexed"
        assert len(self.hash_to_block) == sum(b.hash is not None for b in self.blocks)

    def describe(self) -> str:
        """Block tables, reference counts, the free list and the LRU cached list, as text."""
        lines = [f"BlockManager: {self.num_blocks} blocks x {self.block_size} slots  {self.stats()}"]
        for seq_id, seq in self.seqs.items():
            table = " ".join(f"{b}(r{self.blocks[b].ref_count}{'#' if self.blocks[b].hash is not None else ''})" for b in seq.block_table)
            lines.append(f"  seq {seq_id!s:>6}: {len(seq.token_ids):4d} tokens -> [{table}]")
        lines += [f"  free list: {self.free_list[::-1]}", f"  cached (LRU first): {list(self.cached)}"]
        return "\n".join(lines)


if __name__ == "__main__":
    from mlsys_ref.backend import default_device
    from mlsys_ref.testing import max_error

    manager = BlockManager(num_blocks=12, block_size=4, verbose=True)
    manager.allocate("a", list(range(100, 109)) + [1, 2])
    manager.mark_computed("a", 11)  # its 2 full blocks are now named and shareable
    print("cached tokens for b:", manager.allocate("b", list(range(100, 109)) + [7]))
    manager.fork("a", "a2")
    manager.append_slot("a2", 3)  # a2 writes into a's shared last block: copy-on-write
    print("pending copies:", manager.copy_on_write_pending())
    manager.check_invariants()
    print(manager.describe())

    k_cache, v_cache = allocate_kv_cache(1, 12, 4, 2, 32, torch.float32, default_device())[0]
    slots = torch.tensor(manager.slot_mapping("a", 0, 11) + [-1], device=k_cache.device)
    k, v = torch.randn(2, 12, 2, 32, device=k_cache.device)
    write_kv(k_cache, v_cache, k, v, slots)
    write_kv_reference(k_ref := torch.zeros_like(k_cache), v_ref := torch.zeros_like(v_cache), k, v, slots)
    print(f"write_kv vs reference: max error {max(max_error(k_cache, k_ref), max_error(v_cache, v_ref)):.1e}")
