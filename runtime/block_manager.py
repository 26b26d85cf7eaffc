"""The paged KV cache's bookkeeping: a pool of fixed-size blocks, per-request block tables,
reference counts, and prefix caching by block hash.

A full block is named by the hash of its tokens and of the block before it, so two requests with
a common prefix share its blocks. A freed block keeps its hash and stays findable until it is
evicted: free blocks are handed out oldest-freed first (LRU).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np

from kiln.runtime.request import Request


def hash_block(parent: bytes | None, token_ids: list[int]) -> bytes:
    h = hashlib.blake2b(parent or b"", digest_size=16)
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got num_blocks={num_blocks}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[bytes, int] = {}  # hash -> block id, for full blocks

    # ------------------------------------------------------------ queries

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_cached_prefix(self, request: Request) -> list[int]:
        """Blocks already holding a prefix of the request's tokens. At least one token is always
        left to compute, since its logits are needed."""
        if not self.enable_prefix_caching or request.prompt_logprobs is not None:
            return []
        tokens = request.all_token_ids
        blocks, parent = [], None
        for start in range(0, len(tokens) - 1 - self.block_size + 1, self.block_size):
            parent = hash_block(parent, tokens[start:start + self.block_size])
            block = self.cached.get(parent)
            if block is None:
                break
            blocks.append(block)
        return blocks

    # ------------------------------------------------------------ allocation

    def allocate(self, request: Request, num_new_tokens: int, cached_blocks: list[int] = ()) -> bool:
        """Give the request blocks for `num_new_tokens` more tokens (after `cached_blocks`, reused
        from the prefix cache, when it holds none yet). False, changing nothing, when the pool is short."""
        have = len(request.block_ids) + len(cached_blocks)
        total = request.num_computed_tokens + len(cached_blocks) * self.block_size + num_new_tokens
        if not cached_blocks and total <= have * self.block_size:  # (most decode steps: room in its last block)
            return True
        need_new = max(self.blocks_needed(total) - have, 0)
        reclaimable = sum(1 for b in cached_blocks if self.ref_counts[b] == 0)
        if need_new + reclaimable > self.num_free_blocks:
            return False
        for b in cached_blocks:
            if self.ref_counts[b] == 0:
                del self.free_queue[b]
            self.ref_counts[b] += 1
        request.block_ids.extend(cached_blocks)
        request.block_hashes.extend(self.block_hash[b] for b in cached_blocks)
        for _ in range(need_new):
            b, _ = self.free_queue.popitem(last=False)
            if self.block_hash[b] is not None:  # evict its cached content
                if self.cached.get(self.block_hash[b]) == b:
                    del self.cached[self.block_hash[b]]
                self.block_hash[b] = None
            self.ref_counts[b] = 1
            request.block_ids.append(b)
        return True

    def cache_full_blocks(self, request: Request) -> None:
        """Register the request's newly filled blocks under their hashes."""
        if not self.enable_prefix_caching:
            return
        known = len(request.prompt_token_ids) + len(request.output_token_ids)
        # (a token still being sampled on the device is computed but not known: its block waits)
        num_full = min(min(request.num_computed_tokens, known) // self.block_size, len(request.block_ids))
        for i in range(len(request.block_hashes), num_full):
            parent = request.block_hashes[-1] if request.block_hashes else None
            h = hash_block(parent, request.token_ids(i * self.block_size, (i + 1) * self.block_size))
            request.block_hashes.append(h)
            b = request.block_ids[i]
            if self.block_hash[b] is None:
                self.block_hash[b] = h
                self.cached.setdefault(h, b)

    def free(self, request: Request) -> None:
        """Release the request's blocks; the last ones freed are evicted first (a prefix outlives its tail)."""
        for b in reversed(request.block_ids):
            self.ref_counts[b] -= 1
            assert self.ref_counts[b] >= 0, f"block {b} freed twice"
            if self.ref_counts[b] == 0:
                self.free_queue[b] = None
        request.block_ids = []
        request.block_hashes = []

    def check_invariants(self, live: list[Request]) -> None:
        """Every block is either free (ref 0) or referenced exactly by the live requests holding it."""
        counts = [0] * self.num_blocks
        for r in live:
            for b in r.block_ids:
                counts[b] += 1
        assert counts == self.ref_counts, "block reference counts disagree with the requests holding them"
        free = {b for b in range(self.num_blocks) if counts[b] == 0}
        assert free == set(self.free_queue), "free queue disagrees with unreferenced blocks"
        for h, b in self.cached.items():
            assert self.block_hash[b] == h, f"cached hash of block {b} is stale"
