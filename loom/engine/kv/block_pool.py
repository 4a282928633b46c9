"""The pool of KV-cache blocks: reference counts, an LRU free queue, and the prefix-cache index.

A block is in exactly one of three states:
    in use      ref_count > 0, not in the free queue (its hash, if any, lets other requests share it)
    cached      ref_count == 0, in the free queue, hash still indexed: reusable by a prefix hit until evicted
    free        ref_count == 0, in the free queue, no hash
Allocation takes blocks from the head of the free queue (least recently freed first), evicting any hash they
carry; freeing appends to the tail. So unreferenced cached blocks are evicted in LRU order, only under pressure.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

BlockKey = Hashable  # the KV manager uses a digest of (parent block's key, this block's token ids)


@dataclass(slots=True)
class KVBlock:
    block_id: int
    ref_count: int = 0
    key: BlockKey | None = None  # set while the block is indexed in the prefix cache


class BlockPool:
    def __init__(self, num_blocks: int):
        if num_blocks <= 0:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[BlockKey, KVBlock] = {}
        self._num_cached_unused = 0  # blocks in the free queue that still carry a hash (kept up to date: O(1) reads)
        self.num_evictions = 0

    @property
    def num_free(self) -> int:
        """Blocks that can be allocated now (free or evictable cached)."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    @property
    def num_used(self) -> int:
        """Blocks some request holds (ref_count > 0)."""
        return self.num_blocks - len(self._free)

    @property
    def num_cached_unused(self) -> int:
        """Blocks no request holds that a prefix hit could still revive (evicted first-in, first-out)."""
        return self._num_cached_unused

    def lookup(self, key: BlockKey) -> KVBlock | None:
        return self._cached.get(key)

    def allocate(self, n: int) -> list[KVBlock] | None:
        """n fresh blocks with ref_count 1, or None (nothing changed) if fewer than n are available."""
        if n > len(self._free):
            return None
        out = []
        for _ in range(n):
            _, block = self._free.popitem(last=False)
            if block.key is not None:
                del self._cached[block.key]
                block.key = None
                self.num_evictions += 1
                self._num_cached_unused -= 1
            block.ref_count = 1
            out.append(block)
        return out

    def acquire(self, blocks: list[KVBlock]) -> None:
        """Take a reference on blocks found by `lookup` (revives cached ones out of the free queue)."""
        for block in blocks:
            if block.ref_count == 0:
                del self._free[block.block_id]
                self._num_cached_unused -= block.key is not None
            block.ref_count += 1

    def release(self, blocks: list[KVBlock]) -> None:
        """Drop one reference each; a block reaching zero joins the tail of the free queue, hash kept."""
        for block in blocks:
            assert block.ref_count > 0, f"double free of block {block.block_id}"
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block.block_id] = block
                self._num_cached_unused += block.key is not None

    def index(self, block: KVBlock, key: BlockKey) -> bool:
        """Make a full block findable by its key. False if an identical block is already indexed (kept as is)."""
        if block.key is not None or key in self._cached:
            return False
        block.key = key
        self._cached[key] = block
        self._num_cached_unused += block.ref_count == 0
        return True

    def reset_prefix_cache(self) -> None:
        for block in self._cached.values():
            block.key = None
        self._cached.clear()
        self._num_cached_unused = 0

    def check_integrity(self, expected_refs: dict[int, int]) -> None:
        """`expected_refs`: block id → number of block tables holding it (from the KV manager)."""
        for block in self.blocks:
            refs = expected_refs.get(block.block_id, 0)
            assert block.ref_count == refs, f"block {block.block_id}: ref_count {block.ref_count}, held {refs} times"
            in_free = block.block_id in self._free
            assert in_free == (refs == 0), f"block {block.block_id}: in free queue {in_free} with {refs} refs"
            if block.key is not None:
                assert self._cached.get(block.key) is block, f"block {block.block_id}: key not indexed"
        assert all(b.key == k for k, b in self._cached.items()), "prefix index points at a re-keyed block"
        assert len(self._free) + sum(1 for b in self.blocks if b.ref_count > 0) == self.num_blocks
        cached_unused = sum(1 for b in self._free.values() if b.key is not None)
        assert cached_unused == self._num_cached_unused, \
            f"{cached_unused} cached blocks in the free queue, counted {self._num_cached_unused}"
