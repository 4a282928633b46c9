"""BlockPool and KVCacheManager: check-then-commit allocation, exact block ids, ref counts, prefix-cache hits and
LRU eviction. Block size 4 throughout; `kv.check_integrity()` ends every scenario."""

from __future__ import annotations

import pytest

from loom.engine.kv.block_pool import BlockPool
from loom.engine.kv.kv_manager import KVCacheManager

BS = 4


def ids(blocks) -> list[int]:
    return [b.block_id for b in blocks]


def refs(kv: KVCacheManager) -> list[int]:
    return [b.ref_count for b in kv.pool.blocks]


def compute(kv: KVCacheManager, rid: str, tokens: list[int], cached=()) -> None:
    """What the scheduler does for a request whose whole prompt runs in one step: allocate, then index."""
    assert kv.allocate(rid, len(tokens), cached)
    kv.index_full_blocks(rid, tokens, len(tokens))


# ---------------------------------------------------------------- BlockPool


def test_pool_needs_a_block():
    with pytest.raises(ValueError, match="at least one block"):
        BlockPool(0)


def test_pool_hands_out_ids_in_lru_order():
    pool = BlockPool(8)
    a = pool.allocate(3)
    b = pool.allocate(2)
    assert ids(a) == [0, 1, 2] and ids(b) == [3, 4]
    assert [blk.ref_count for blk in a + b] == [1] * 5
    assert pool.num_free == 3
    pool.release([a[1]])
    pool.release([a[0]])
    # Never-used blocks first, then in the order they were freed.
    assert ids(pool.allocate(5)) == [5, 6, 7, 1, 0]
    assert pool.num_free == 0
    pool.check_integrity({0: 1, 1: 1, 2: 1, 3: 1, 4: 1, 5: 1, 6: 1, 7: 1})


def test_pool_failing_allocate_changes_nothing():
    pool = BlockPool(8)
    assert pool.allocate(9) is None
    assert pool.num_free == 8
    assert ids(pool.allocate(6)) == [0, 1, 2, 3, 4, 5]
    assert pool.allocate(3) is None
    assert pool.num_free == 2
    assert [b.ref_count for b in pool.blocks] == [1] * 6 + [0, 0]
    assert ids(pool.allocate(2)) == [6, 7]
    pool.check_integrity({i: 1 for i in range(8)})


def test_pool_release_twice_is_a_double_free():
    pool = BlockPool(2)
    [b] = pool.allocate(1)
    pool.release([b])
    with pytest.raises(AssertionError, match="double free of block 0"):
        pool.release([b])


def test_pool_acquire_shares_and_revives():
    pool = BlockPool(3)
    [b0, b1] = pool.allocate(2)
    pool.acquire([b0])  # shared while in use: stays out of the free queue
    assert b0.ref_count == 2 and pool.num_free == 1
    pool.release([b1])
    assert pool.num_free == 2
    pool.acquire([b1])  # cached → in use: leaves the free queue
    assert b1.ref_count == 1 and pool.num_free == 1
    assert ids(pool.allocate(1)) == [2]
    pool.check_integrity({0: 2, 1: 1, 2: 1})


def test_pool_duplicate_index_keeps_first_block():
    pool = BlockPool(4)
    b0, b1 = pool.allocate(2)
    key = (None, (1, 2, 3, 4))
    assert pool.index(b0, key) is True
    assert pool.index(b1, key) is False
    assert pool.lookup(key) is b0
    assert b0.key == key and b1.key is None
    assert pool.index(b0, (None, (9, 9, 9, 9))) is False  # a block keeps the key it has
    assert pool.lookup((None, (9, 9, 9, 9))) is None
    assert pool.num_cached == 1
    pool.check_integrity({0: 1, 1: 1})


def test_pool_allocate_evicts_cached_head_and_counts():
    pool = BlockPool(2)
    b0, b1 = pool.allocate(2)
    pool.index(b0, (None, (1,)))
    pool.index(b1, (None, (2,)))
    pool.release([b0, b1])
    assert pool.num_free == 2 and pool.num_cached == 2  # freed but still findable
    assert pool.lookup((None, (1,))) is b0
    assert ids(pool.allocate(1)) == [0]
    assert pool.num_evictions == 1
    assert pool.lookup((None, (1,))) is None and b0.key is None
    assert pool.lookup((None, (2,))) is b1
    pool.check_integrity({0: 1})


def test_pool_reset_prefix_cache_forgets_every_key():
    pool = BlockPool(2)
    b0, b1 = pool.allocate(2)
    pool.index(b0, (None, (1,)))
    pool.release([b0])
    pool.reset_prefix_cache()
    assert pool.num_cached == 0 and b0.key is None
    assert pool.lookup((None, (1,))) is None
    assert pool.num_free == 1
    pool.check_integrity({1: 1})


# ---------------------------------------------------------------- KVCacheManager: tables


def test_allocate_grows_table_with_exact_ids():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    assert kv.allocate("a", 5)
    assert kv.block_ids("a") == [0, 1]
    assert kv.allocate("a", 8)  # still fits in two blocks: nothing new
    assert kv.block_ids("a") == [0, 1]
    assert kv.allocate("b", 1)
    assert kv.allocate("a", 9)
    assert kv.block_ids("a") == [0, 1, 3] and kv.block_ids("b") == [2]
    assert kv.num_free_blocks == 4 and kv.num_tables() == 2
    assert kv.blocks_needed(0) == 0 and kv.blocks_needed(4) == 1 and kv.blocks_needed(5) == 2
    kv.check_integrity()


def test_allocate_is_check_then_commit():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    assert kv.allocate("a", 12)
    before = refs(kv)
    assert not kv.allocate("b", 8)  # needs 2, 1 free
    assert not kv.allocate("a", 20)  # grow by 2, 1 free
    assert kv.num_free_blocks == 1
    assert kv.block_ids("a") == [0, 1, 2] and kv.block_ids("b") == []
    assert kv.num_tables() == 1
    assert refs(kv) == before
    assert kv.allocate("b", 4) and kv.block_ids("b") == [3]
    kv.check_integrity()


def test_free_returns_every_block_and_unknown_free_is_a_noop():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    assert kv.allocate("a", 16)
    kv.free("a")
    kv.free("a")
    kv.free("never-seen")
    assert kv.num_free_blocks == 4 and kv.num_tables() == 0
    assert refs(kv) == [0, 0, 0, 0]
    kv.check_integrity()


# ---------------------------------------------------------------- prefix cache


def test_find_cached_prefix_returns_exact_blocks_and_never_the_last_token():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    prompt = list(range(12))  # exactly 3 full blocks
    compute(kv, "a", prompt)
    assert kv.block_ids("a") == [0, 1, 2] and kv.pool.num_cached == 3
    # The last token must be computed for its logits: a 12-token prompt hits only 2 of its 3 cached blocks.
    assert ids(kv.find_cached_prefix(prompt)) == [0, 1]
    assert ids(kv.find_cached_prefix(prompt + [99])) == [0, 1, 2]
    assert ids(kv.find_cached_prefix(prompt[:9])) == [0, 1]
    assert ids(kv.find_cached_prefix(prompt[:8])) == [0]
    assert ids(kv.find_cached_prefix(prompt[:5])) == [0]
    assert kv.find_cached_prefix(prompt[:4]) == []
    assert ids(kv.find_cached_prefix(prompt[:4] + [50, 51, 52, 53, 54])) == [0]  # stops at the first miss
    assert kv.find_cached_prefix([]) == []
    # Read-only: nothing referenced by a lookup.
    assert refs(kv)[:3] == [1, 1, 1]
    kv.check_integrity()


def test_keys_are_chained_so_equal_blocks_after_a_different_prefix_miss():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    compute(kv, "a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert kv.pool.num_cached == 2
    # Block 1's tokens (5..8) are identical, but they follow a different first block.
    assert kv.find_cached_prefix([0, 2, 3, 4, 5, 6, 7, 8, 9]) == []
    compute(kv, "b", [0, 2, 3, 4, 5, 6, 7, 8, 9])
    assert kv.block_ids("b") == [3, 4, 5]
    assert kv.pool.num_cached == 4  # b's second block was indexed under its own chain, not deduplicated
    assert ids(kv.find_cached_prefix([0, 2, 3, 4, 5, 6, 7, 8, 0])) == [3, 4]
    assert ids(kv.find_cached_prefix([1, 2, 3, 4, 5, 6, 7, 8, 0])) == [0, 1]
    kv.check_integrity()


def test_index_full_blocks_only_indexes_computed_full_blocks():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    tokens = list(range(10))
    assert kv.allocate("a", 10)
    kv.index_full_blocks("a", tokens, 3)
    assert kv.pool.num_cached == 0
    kv.index_full_blocks("a", tokens, 7)
    assert kv.pool.num_cached == 1
    kv.index_full_blocks("a", tokens, 10)  # block 2 holds positions 8, 9 only
    assert kv.pool.num_cached == 2
    assert [b.key is not None for b in kv.pool.blocks] == [True, True, False, False]
    assert ids(kv.find_cached_prefix(tokens + [10, 11, 12])) == [0, 1]
    kv.check_integrity()


def test_shared_prefix_blocks_are_ref_counted():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    a = list(range(9))
    compute(kv, "a", a)  # [0, 1, 2], blocks 0 and 1 indexed
    b = a[:8] + [70, 71, 72]
    hits = kv.find_cached_prefix(b)
    assert ids(hits) == [0, 1]
    assert kv.allocate("b", len(b), hits)
    assert kv.block_ids("b") == [0, 1, 3]
    assert refs(kv)[:4] == [2, 2, 1, 1]
    assert kv.num_free_blocks == 4
    kv.check_integrity()
    kv.free("a")
    assert refs(kv)[:4] == [1, 1, 0, 1]
    assert kv.num_free_blocks == 5  # only a's private block came back
    kv.check_integrity()
    kv.index_full_blocks("b", b, 11)  # b's blocks 0,1 are already indexed, its block 2 is not full
    assert kv.pool.num_cached == 2
    kv.free("b")
    assert refs(kv) == [0] * 8 and kv.num_free_blocks == 8
    assert ids(kv.find_cached_prefix(b)) == [0, 1]
    kv.check_integrity()


def test_hits_then_new_full_blocks_extend_the_chain():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    compute(kv, "a", list(range(5)))  # block 0 indexed
    b = list(range(13))
    hits = kv.find_cached_prefix(b)
    assert ids(hits) == [0]
    compute(kv, "b", b, hits)
    assert kv.block_ids("b") == [0, 2, 3, 4]
    # b's blocks 1 and 2 were indexed as children of the hit block's key.
    assert ids(kv.find_cached_prefix(b + [13])) == [0, 2, 3]
    kv.check_integrity()


def test_freed_blocks_stay_findable_and_evict_lru_tail_first():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    a = list(range(13))
    compute(kv, "a", a)  # [0, 1, 2, 3]; 0..2 full and indexed, 3 holds position 12
    kv.free("a")
    # Free queue now: 4 5 6 7 (never used) | 3 2 1 0 (a's blocks, tail first).
    assert kv.num_free_blocks == 8 and kv.pool.num_cached == 3
    assert ids(kv.find_cached_prefix(a)) == [0, 1, 2]
    assert kv.allocate("x", 16) and kv.block_ids("x") == [4, 5, 6, 7]
    assert ids(kv.find_cached_prefix(a)) == [0, 1, 2] and kv.pool.num_evictions == 0
    assert kv.allocate("y", 1) and kv.block_ids("y") == [3]  # unindexed: no eviction
    assert kv.pool.num_evictions == 0
    assert kv.allocate("z", 1) and kv.block_ids("z") == [2]  # a's last full block goes before its head
    assert kv.pool.num_evictions == 1
    assert ids(kv.find_cached_prefix(a)) == [0, 1]
    assert kv.allocate("w", 4) and kv.block_ids("w") == [1]
    assert ids(kv.find_cached_prefix(a)) == [0]
    assert kv.pool.num_evictions == 2 and kv.pool.num_cached == 1
    kv.check_integrity()


def test_eviction_follows_free_order_across_requests():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    compute(kv, "a", [1] * 5)  # [0, 1]
    compute(kv, "b", [2] * 5)  # [2, 3]
    kv.free("b")  # b freed first → evicted first
    kv.free("a")
    # Free queue: 3 2 1 0
    assert kv.allocate("c", 4) and kv.block_ids("c") == [3]
    assert kv.allocate("d", 4) and kv.block_ids("d") == [2]
    assert kv.find_cached_prefix([2] * 5) == []
    assert ids(kv.find_cached_prefix([1] * 5)) == [0]
    kv.check_integrity()


def test_cached_hit_is_revived_and_counts_against_availability():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    a = list(range(9))
    compute(kv, "a", a)  # [0, 1, 2]
    kv.free("a")  # free queue: 3 2 1 0, blocks 0 and 1 cached
    b = a[:8] + list(range(100, 105))  # 13 tokens → 4 blocks: 2 hits + 2 new
    hits = kv.find_cached_prefix(b)
    assert ids(hits) == [0, 1] and [h.ref_count for h in hits] == [0, 0]
    # 3 new + 2 revived > 4 free: refused, nothing changed.
    assert not kv.allocate("b", 17, hits)
    assert kv.num_free_blocks == 4 and kv.block_ids("b") == [] and refs(kv) == [0, 0, 0, 0]
    assert ids(kv.find_cached_prefix(b)) == [0, 1]
    kv.check_integrity()
    # 2 new + 2 revived == 4 free: the hits leave the free queue before new blocks are taken from it.
    assert kv.allocate("b", 13, hits)
    assert kv.block_ids("b") == [0, 1, 3, 2]
    assert refs(kv) == [1, 1, 1, 1] and kv.num_free_blocks == 0
    assert kv.pool.num_evictions == 0 and kv.pool.num_cached == 2
    assert kv.pool.allocate(1) is None
    kv.check_integrity()
    kv.free("b")
    assert kv.num_free_blocks == 4
    kv.check_integrity()


def test_hits_on_blocks_in_use_do_not_need_free_blocks():
    kv = KVCacheManager(num_blocks=3, block_size=BS)
    a = list(range(9))
    compute(kv, "a", a)  # uses all 3 blocks
    assert kv.num_free_blocks == 0
    hits = kv.find_cached_prefix(a[:5])
    assert ids(hits) == [0]
    assert kv.allocate("b", 4, hits)  # entirely covered by a shared in-use block
    assert kv.block_ids("b") == [0] and refs(kv) == [2, 1, 1]
    assert not kv.allocate("b", 5)  # growing needs a free block
    assert kv.block_ids("b") == [0]
    kv.check_integrity()


def test_duplicate_computation_keeps_the_first_indexed_block():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    p = list(range(9))
    assert kv.allocate("a", 9) and kv.allocate("b", 9)  # both admitted before either indexed
    kv.index_full_blocks("a", p, 9)
    kv.index_full_blocks("b", p, 9)
    assert kv.block_ids("a") == [0, 1, 2] and kv.block_ids("b") == [3, 4, 5]
    assert kv.pool.num_cached == 2
    assert [kv.pool.blocks[i].key is None for i in (3, 4)] == [True, True]
    assert ids(kv.find_cached_prefix(p)) == [0, 1]
    kv.free("a")
    kv.free("b")
    assert ids(kv.find_cached_prefix(p)) == [0, 1]
    kv.check_integrity()


def test_prefix_caching_disabled_never_indexes_or_hits():
    kv = KVCacheManager(num_blocks=4, block_size=BS, enable_prefix_caching=False)
    p = list(range(9))
    compute(kv, "a", p)
    assert kv.pool.num_cached == 0
    kv.free("a")
    assert kv.find_cached_prefix(p) == []
    kv.check_integrity()


def test_reset_prefix_cache_drops_hits():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    p = list(range(9))
    compute(kv, "a", p)
    kv.free("a")
    kv.pool.reset_prefix_cache()
    assert kv.find_cached_prefix(p) == []
    assert kv.num_free_blocks == 4
    kv.check_integrity()


# ---------------------------------------------------------------- integrity check


def _busy_manager() -> KVCacheManager:
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    compute(kv, "a", list(range(5)))  # [0, 1]
    kv.free("a")
    compute(kv, "b", list(range(5)), kv.find_cached_prefix(list(range(5))))  # shares block 0
    kv.check_integrity()
    return kv


def test_check_integrity_catches_a_bumped_ref_count():
    kv = _busy_manager()
    kv.pool.blocks[kv.block_ids("b")[0]].ref_count += 1
    with pytest.raises(AssertionError, match="ref_count 2, held 1 times"):
        kv.check_integrity()


def test_check_integrity_catches_an_in_use_block_in_the_free_queue():
    kv = _busy_manager()
    block = kv.pool.blocks[kv.block_ids("b")[0]]
    kv.pool._free[block.block_id] = block
    with pytest.raises(AssertionError, match="in free queue True with 1 refs"):
        kv.check_integrity()


def test_check_integrity_catches_a_lost_free_block():
    kv = _busy_manager()
    free_id = next(b.block_id for b in kv.pool.blocks if b.ref_count == 0)
    del kv.pool._free[free_id]
    with pytest.raises(AssertionError, match="in free queue False with 0 refs"):
        kv.check_integrity()


def test_check_integrity_catches_an_unindexed_key():
    kv = _busy_manager()
    block = kv.pool.blocks[kv.block_ids("b")[0]]
    del kv.pool._cached[block.key]
    with pytest.raises(AssertionError, match="key not indexed"):
        kv.check_integrity()


def test_check_integrity_catches_more_keys_than_blocks():
    kv = _busy_manager()
    kv._keys["b"].extend([(None, (0,))] * 3)
    with pytest.raises(AssertionError, match="more keys than blocks"):
        kv.check_integrity()


def test_check_integrity_catches_a_block_twice_in_one_table():
    kv = _busy_manager()
    table = kv._tables["b"]
    table.append(table[0])
    table[0].ref_count += 1  # the counts agree: only the duplicate is wrong
    with pytest.raises(AssertionError, match="a block twice in its table"):
        kv.check_integrity()


def test_block_state_counts_follow_every_transition():
    """used + cached + free = total after each pool operation, the counts kept in O(1) (the debug metric's
    source), and the integrity check holds them to a recount."""
    kv = KVCacheManager(num_blocks=6, block_size=BS)
    pool = kv.pool

    def counts() -> tuple[int, int, int]:
        kv.check_integrity()
        free = pool.num_blocks - pool.num_used - pool.num_cached_unused
        return pool.num_used, pool.num_cached_unused, free

    assert counts() == (0, 0, 6)
    compute(kv, "a", list(range(9)))  # 3 blocks, 2 full ones indexed
    assert counts() == (3, 0, 3)
    kv.free("a")
    assert counts() == (0, 2, 4)
    compute(kv, "b", list(range(9)), kv.find_cached_prefix(list(range(9))))  # revives both cached blocks
    assert counts() == (3, 0, 3)
    kv.free("b")
    assert counts() == (0, 2, 4)
    compute(kv, "c", [100 + t for t in range(24)])  # needs all 6: evicts the 2 cached blocks
    assert counts() == (6, 0, 0)
    kv.free("c")
    assert counts() == (0, 6, 0)
    pool.reset_prefix_cache()
    assert counts() == (0, 0, 6)
    pool._num_cached_unused += 1
    with pytest.raises(AssertionError, match="cached blocks in the free queue, counted"):
        kv.check_integrity()
