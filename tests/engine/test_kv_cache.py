"""BlockManager: allocation, reference counts, prefix caching and LRU eviction (no model)."""

from __future__ import annotations

import itertools

from surge.engine.kv_cache import BlockManager
from surge.engine.request import Request
from surge.sampling_params import SamplingParams

BS = 4  # block size of every manager here
_ids = itertools.count()


def make_request(tokens: list[int]) -> Request:
    return Request(f"r{next(_ids)}", list(tokens), SamplingParams())


def admit(bm: BlockManager, request: Request) -> list[int]:
    """What the scheduler does for a whole prompt: look up, allocate, compute, register."""
    cached = bm.find_cached_prefix(request)
    assert bm.allocate_slots(request, request.num_tokens - len(cached) * bm.block_size, cached)
    request.num_computed_tokens = request.num_tokens
    bm.cache_full_blocks(request)
    return cached


def ref_counts(bm: BlockManager) -> list[int]:
    return [block.ref_count for block in bm.blocks]


def test_allocate_grow_and_free_counts() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    request = make_request(range(10))
    assert bm.allocate_slots(request, 10)
    assert len(request.block_ids) == 3 and len(set(request.block_ids)) == 3
    assert bm.num_free_blocks == 5
    assert bm.usage == 3 / 8
    assert all(bm.blocks[b].ref_count == 1 for b in request.block_ids)

    request.num_computed_tokens = 10
    assert bm.allocate_slots(request, 2)  # 12 tokens: still 3 blocks
    assert len(request.block_ids) == 3
    assert bm.allocate_slots(request, 3)  # 13 tokens: a 4th block
    assert len(request.block_ids) == 4 and bm.num_free_blocks == 4

    bm.free(request)
    assert request.block_ids == []
    assert bm.num_free_blocks == 8 and bm.usage == 0
    assert ref_counts(bm) == [0] * 8


def test_shared_prefix_is_ref_counted_not_copied() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_request(range(1, 13))  # 3 full blocks
    admit(bm, a)
    b = make_request([*range(1, 9), 20, 21, 22])  # shares a's first 2 blocks
    hits = admit(bm, b)
    assert hits == a.block_ids[:2]
    assert b.block_ids[:2] == a.block_ids[:2]
    assert b.block_ids[2] not in a.block_ids
    assert [bm.blocks[x].ref_count for x in a.block_ids] == [2, 2, 1]
    assert bm.num_free_blocks == 8 - 4

    bm.free(a)
    # The shared blocks still belong to b: not free, not evictable.
    assert [bm.blocks[x].ref_count for x in b.block_ids] == [1, 1, 1]
    assert bm.num_free_blocks == 5
    hog = make_request(range(100, 120))  # exactly the 5 free blocks
    assert bm.allocate_slots(hog, 20)
    assert not set(hog.block_ids) & set(b.block_ids)
    assert bm.num_free_blocks == 0
    bm.free(hog)
    bm.free(b)
    assert bm.num_free_blocks == 8 and ref_counts(bm) == [0] * 8


def test_prefix_hit_returns_same_blocks_and_counts_tokens() -> None:
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = make_request(range(1, 14))  # 13 tokens: 3 full blocks registered
    assert admit(bm, a) == []
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (13, 0)

    b = make_request([*range(1, 13), 99, 98])  # same 12-token prefix
    assert bm.find_cached_prefix(b) == a.block_ids[:3]
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (13 + 14, 12)

    c = make_request([*range(1, 5), 77, 6, 7, 8, 9])  # diverges inside block 1
    assert bm.find_cached_prefix(c) == a.block_ids[:1]
    assert bm.prefix_cache_hits == 12 + 4


def test_at_least_one_token_is_left_to_compute() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_request(range(1, 9))  # exactly 2 blocks
    admit(bm, a)
    same = make_request(range(1, 9))
    # Its last block is cached too, but its last token must run to give the next token.
    assert bm.find_cached_prefix(same) == a.block_ids[:1]
    longer = make_request(range(1, 10))
    assert bm.find_cached_prefix(longer) == a.block_ids[:2]
    single_block = make_request(range(1, 5))
    assert bm.find_cached_prefix(single_block) == []


def test_lru_eviction_least_recently_freed_first_and_revived_blocks_survive() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    a, b, c = make_request([1, 2]), make_request([3, 4]), make_request([5, 6])
    for request in (a, b, c):
        admit(bm, request)
    block_a, block_b, block_c = a.block_ids[0], b.block_ids[0], c.block_ids[0]
    for request in (a, b, c):
        bm.free(request)
    assert bm.num_free_blocks == 4

    # Revive b's cached block: it leaves the free queue and must not be evicted.
    b2 = make_request([3, 4, 9])
    assert admit(bm, b2) == [block_b]
    assert bm.blocks[block_b].ref_count == 1
    # b2's second block came from the never-used block, not from a cached one.
    assert b2.block_ids[1] not in (block_a, block_c)

    d = make_request([7, 8])
    assert admit(bm, d) == []
    assert d.block_ids == [block_a]  # a was freed before c: evicted first

    # The evicted block now holds d's tokens; a's prefix must not find it.
    assert bm.find_cached_prefix(make_request([1, 2, 0])) == []
    assert bm.blocks[block_a].token_ids == (7, 8)
    assert bm.find_cached_prefix(make_request([7, 8, 0])) == [block_a]
    assert bm.find_cached_prefix(make_request([5, 6, 0])) == [block_c]
    assert bm.find_cached_prefix(make_request([3, 4, 0])) == [block_b]


def test_eviction_drops_the_hash() -> None:
    bm = BlockManager(num_blocks=1, block_size=2)
    a = make_request([1, 2])
    admit(bm, a)
    (block,) = a.block_ids
    bm.free(a)
    assert bm.find_cached_prefix(make_request([1, 2, 3])) == [block]

    other = make_request([5, 6])
    assert bm.allocate_slots(other, 2)  # evicts a's block before any KV is written
    assert bm.blocks[block].block_hash is None
    assert a.block_hashes[0] not in bm.cached
    assert bm.find_cached_prefix(make_request([1, 2, 3])) == []


def test_freeing_releases_tail_blocks_first() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    a = make_request([1, 2, 3, 4, 5, 6])
    admit(bm, a)
    head, middle, tail = a.block_ids
    bm.free(a)
    # The never-used block goes first, then a's tail; the head of a prefix survives longest.
    assert admit(bm, make_request([50, 51])) == []
    x = make_request([60, 61])
    admit(bm, x)
    assert x.block_ids == [tail]
    assert bm.find_cached_prefix(make_request([1, 2, 3, 4, 0])) == [head, middle]


def test_failed_allocation_changes_nothing() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = make_request(range(1, 13))  # 3 blocks
    admit(bm, a)
    before = (ref_counts(bm), dict(bm.cached), list(bm.free_queue), bm.num_free_blocks)
    b = make_request(range(50, 58))  # needs 2 blocks, 1 free
    assert not bm.allocate_slots(b, 8)
    assert b.block_ids == []
    assert (ref_counts(bm), dict(bm.cached), list(bm.free_queue), bm.num_free_blocks) == before

    # With prefix hits to revive: the revived blocks count against the free pool too.
    bm.free(a)
    c = make_request([*range(1, 9), *range(30, 40)])  # 2 hits + 3 new blocks = 5 > 4
    hits = bm.find_cached_prefix(c)
    assert len(hits) == 2
    before = (ref_counts(bm), dict(bm.cached), list(bm.free_queue))
    assert not bm.allocate_slots(c, c.num_tokens - 2 * BS, hits)
    assert c.block_ids == []
    assert (ref_counts(bm), dict(bm.cached), list(bm.free_queue)) == before
    assert bm.num_free_blocks == 4


def test_hash_collision_is_never_a_hit() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_request([1, 2, 3, 4, 5])
    admit(bm, a)
    # Forge a request whose first block hashes like a's but holds other tokens.
    forged = make_request([9, 9, 9, 9, 5])
    forged.block_hashes.append(a.block_hashes[0])
    assert bm.find_cached_prefix(forged) == []
    assert bm.allocate_slots(forged, 5)
    forged.num_computed_tokens = 5
    bm.cache_full_blocks(forged)  # must not replace a's entry with the wrong tokens
    assert bm.cached[a.block_hashes[0]] == a.block_ids[0]
    assert bm.find_cached_prefix(make_request([1, 2, 3, 4, 0])) == a.block_ids[:1]


def test_prefix_caching_disabled_never_hits() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    a = make_request(range(1, 10))
    admit(bm, a)
    assert bm.cached == {}
    assert bm.find_cached_prefix(make_request(range(1, 10))) == []
    assert bm.prefix_cache_hits == 0
