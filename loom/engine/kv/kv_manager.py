"""Per-request block tables over the shared block pool, with prefix-cache lookup and indexing.

A request's KV positions map to blocks through its table: position p lives in slot
`table[p // block_size].block_id * block_size + p % block_size`. Full blocks are indexed by a chained key
(a digest of the parent block's key and the block's token ids), so two requests share a block only when their whole
prefix up to and including that block is identical.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import Counter
from collections.abc import Sequence

from loom.engine.kv.block_pool import BlockPool, KVBlock


def block_key(parent: bytes | None, tokens: Sequence[int], extra: bytes = b"") -> bytes:
    """Chained 128-bit digest. A cryptographic hash, not Python's `hash`: crafted prompts must not be able to
    collide with another request's prefix and read its cached K/V (cf. vLLM CVE-2025-25183). `extra`: what else
    the block's K/V depends on (the content hashes of the images whose tokens it holds)."""
    h = hashlib.blake2b(parent or b"", digest_size=16)
    h.update(array("q", tokens).tobytes())
    if extra:
        h.update(b"extra:" + extra)
    return h.digest()


def _salt_key(salt: str | None) -> bytes | None:
    return None if salt is None else hashlib.blake2b(b"salt:" + salt.encode(), digest_size=16).digest()


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._tables: dict[str, list[KVBlock]] = {}
        self._keys: dict[str, list[bytes]] = {}  # keys of the request's blocks indexed so far

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    def block_ids(self, request_id: str, start: int = 0) -> list[int]:
        """The request's block table from entry `start` on (tables only grow while a request holds its blocks)."""
        table = self._tables.get(request_id, ())
        return [table[i].block_id for i in range(start, len(table))]

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_cached_prefix(self, token_ids: Sequence[int], salt: str | None = None,
                           extras: Sequence[bytes] = ()) -> list[KVBlock]:
        """The longest run of indexed blocks equal to the start of `token_ids`, always leaving the last token
        uncomputed (its logits are needed to sample). Read-only: nothing is referenced until `allocate`.
        `salt`: what else the K/V depends on (a LoRA adapter): blocks match only under the same salt. `extras`:
        per block, what else its own K/V depends on (`protocol.multimodal.block_extras`)."""
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        hits: list[KVBlock] = []
        parent: bytes | None = _salt_key(salt)
        for i in range((len(token_ids) - 1) // bs):
            key = block_key(parent, token_ids[i * bs : (i + 1) * bs], extras[i] if i < len(extras) else b"")
            block = self.pool.lookup(key)
            if block is None:
                break
            hits.append(block)
            parent = key
        return hits

    def allocate(self, request_id: str, num_tokens: int, cached: Sequence[KVBlock] = ()) -> bool:
        """Grow the request's table to cover `num_tokens` positions, first with `cached` prefix hits.

            table: [ cached hits | blocks it already had | new blocks ]   → ceil(num_tokens / block_size) blocks

        Check, then commit: returns False with nothing changed when the pool cannot supply the blocks.
        """
        table = self._tables.get(request_id, [])
        new = self.blocks_needed(num_tokens) - len(table) - len(cached)
        # Hits that nobody references sit in the free queue; taking them shrinks what `allocate` can hand out.
        revived = sum(1 for b in cached if b.ref_count == 0)
        if max(new, 0) + revived > self.pool.num_free:
            return False
        self.pool.acquire(list(cached))
        table.extend(cached)
        if new > 0:
            fresh = self.pool.allocate(new)
            assert fresh is not None  # checked above
            table.extend(fresh)
        self._tables[request_id] = table
        if cached and self.enable_prefix_caching:
            self._keys[request_id] = [b.key for b in cached if b.key is not None]
        return True

    def index_full_blocks(self, request_id: str, token_ids: Sequence[int], num_computed: int,
                          salt: str | None = None, extras: Sequence[bytes] = ()) -> None:
        """Index every block whose positions all have their K/V written (`num_computed` tokens so far), under
        `salt` and `extras` (see `find_cached_prefix`)."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        table = self._tables[request_id]
        keys = self._keys.setdefault(request_id, [])
        for i in range(len(keys), num_computed // bs):
            key = block_key(keys[-1] if keys else _salt_key(salt), token_ids[i * bs : (i + 1) * bs],
                            extras[i] if i < len(extras) else b"")
            keys.append(key)
            self.pool.index(table[i], key)

    def free(self, request_id: str) -> None:
        table = self._tables.pop(request_id, [])
        self._keys.pop(request_id, None)
        # Reverse order: a sequence's tail is evicted before its head, which other requests are likelier to share.
        self.pool.release(table[::-1])

    def num_tables(self) -> int:
        return len(self._tables)

    def check_integrity(self) -> None:
        """free + in use == total, every reference accounted for by a block table, no block twice in one table, the
        prefix index consistent. Raises AssertionError naming the first problem."""
        for request_id, table in self._tables.items():
            ids = [b.block_id for b in table]
            assert len(set(ids)) == len(ids), f"{request_id}: a block twice in its table"
        refs = Counter(b.block_id for table in self._tables.values() for b in table)
        self.pool.check_integrity(dict(refs))
        for request_id, keys in self._keys.items():
            table = self._tables[request_id]
            assert len(keys) <= len(table), f"{request_id}: more keys than blocks"
