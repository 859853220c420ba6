"""Paged KV-cache bookkeeping: block allocation, reference counts and prefix caching.

Only ids and counters live here; the tensors live in the model runner. A block is a fixed
number of token slots. A request owns a list of block ids (its block table). Full blocks are
named by a hash chain (parent hash + their tokens) so a later request with the same prefix
can reuse them. Freed blocks keep their hash and wait in an LRU queue: a prefix hit revives
them, and allocation evicts the least recently freed one. Every operation is O(1) per block.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from surge.engine.request import Request

__all__ = ["Block", "BlockManager"]

_ROOT_HASH = 0


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    # Set once the block is full and registered for prefix reuse; None otherwise.
    block_hash: int | None = None
    # The tokens behind the hash, kept so a hash collision can never return wrong KV.
    token_ids: tuple[int, ...] = ()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, "
                             f"got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Blocks nobody references, least recently freed first. A dict keeps O(1) removal
        # when a cached block is revived from the middle of the queue.
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.prefix_cache_queries = 0  # prompt tokens looked up
        self.prefix_cache_hits = 0  # of those, tokens found in the cache

    # -- queries -----------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by at least one request."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_cached_prefix(self, request: Request) -> list[int]:
        """Ids of cached blocks holding this request's longest known prefix.

        At least one token is always left to compute: its logits give the next token.
        """
        if not self.enable_prefix_caching or request.sampling_params.prompt_logprobs is not None:
            return []  # prompt logprobs need every prompt position computed
        max_blocks = (request.num_tokens - 1) // self.block_size
        self._extend_hashes(request, max_blocks)
        hits: list[int] = []
        for index in range(max_blocks):
            block_id = self.cached.get(request.block_hashes[index])
            if block_id is None or self.blocks[block_id].token_ids != self._block_tokens(
                    request, index):
                break
            hits.append(block_id)
        self.prefix_cache_queries += request.num_tokens
        self.prefix_cache_hits += len(hits) * self.block_size
        return hits

    # -- allocation --------------------------------------------------------------------------

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       cached_block_ids: list[int] = ()) -> bool:
        """Grow the request's block table to hold ``num_new_tokens`` more tokens.

        ``cached_block_ids`` (only for a request that holds no blocks yet) are prefix hits to
        share. Returns False, changing nothing, when there are not enough free blocks.
        """
        num_cached_tokens = len(cached_block_ids) * self.block_size
        total = max(request.num_computed_tokens, num_cached_tokens) + num_new_tokens
        num_new_blocks = self.blocks_needed(total) - len(request.block_ids) - len(
            cached_block_ids)
        # Reviving a cached block that sits in the free queue also takes it from the pool.
        revived = sum(1 for b in cached_block_ids if self.blocks[b].ref_count == 0)
        if num_new_blocks + revived > self.num_free_blocks:
            return False
        for block_id in cached_block_ids:
            self._take(block_id)
        request.block_ids.extend(cached_block_ids)
        for _ in range(max(num_new_blocks, 0)):
            request.block_ids.append(self._take(self._evict_one()))
        return True

    def free(self, request: Request) -> None:
        """Release a request's blocks; tail blocks first so shared prefixes are evicted last."""
        for block_id in reversed(request.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block_id] = None
        request.block_ids.clear()

    def cache_full_blocks(self, request: Request) -> None:
        """Register blocks whose every slot now holds computed KV, for later prefix hits."""
        if not self.enable_prefix_caching:
            return
        num_full = min(request.num_computed_tokens // self.block_size, len(request.block_ids))
        self._extend_hashes(request, num_full)
        for index in range(num_full):
            block = self.blocks[request.block_ids[index]]
            if block.block_hash is not None:
                continue
            block_hash = request.block_hashes[index]
            if block_hash in self.cached:
                continue  # another request computed the same prefix first; keep theirs
            block.block_hash = block_hash
            block.token_ids = self._block_tokens(request, index)
            self.cached[block_hash] = block.block_id

    # -- internals ---------------------------------------------------------------------------

    def _block_tokens(self, request: Request, index: int) -> tuple[int, ...]:
        start = index * self.block_size
        return tuple(request.token_ids[start:start + self.block_size])

    def _extend_hashes(self, request: Request, num_blocks: int) -> None:
        hashes = request.block_hashes
        while len(hashes) < num_blocks:
            parent = hashes[-1] if hashes else _ROOT_HASH
            hashes.append(hash((parent, self._block_tokens(request, len(hashes)))))

    def _take(self, block_id: int) -> int:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_queue[block_id]
        block.ref_count += 1
        return block_id

    def _evict_one(self) -> int:
        block_id = next(iter(self.free_queue))
        block = self.blocks[block_id]
        if block.block_hash is not None:
            if self.cached.get(block.block_hash) == block_id:
                del self.cached[block.block_hash]
            block.block_hash = None
            block.token_ids = ()
        return block_id
