"""Automatic prefix caching over the engine's slot-based KV cache.

vLLM's automatic prefix caching keeps the keys and values of full blocks of prompt tokens and
finds them again by a hash of the block's tokens chained with the hash of everything before it
(so equal hashes mean equal prefixes, not just equal blocks). This engine's cache is not paged:
:class:`~aquilachat.model.KVCache` holds one preallocated row ("slot") per running sequence,
written by position, and a slot that is freed keeps its keys and values until a new occupant
overwrites them. So the blocks live where they were computed, and :class:`PrefixCache` only keeps
the books:

* each slot's chain of block hashes: the full blocks of ``block_size`` tokens whose keys and
  values the slot holds at positions ``[0, len(chain) * block_size)``;
* an index from block hash to the slots holding that block (at its place in their chain);
* when each slot was last used, for LRU eviction.

Admission (:meth:`PrefixCache.allocate`) looks up a new prompt's longest cached prefix of full
blocks. If a *free* slot holds it, the sequence takes that slot and its prefill starts after the
prefix; if only a busy slot holds it (a sequence running with the same system prompt), the
prefix rows are copied into the least recently used free slot (a copy of ``layers x 2 x
prefix`` rows, far cheaper than recomputing them). A prompt with no cached prefix takes the least
recently used free slot. Taking a slot evicts whatever it held beyond the prefix kept, so the
cache is bounded by the KV cache that is already allocated (no memory of its own) and evicted
least-recently-used first. At least the prompt's last token is always recomputed: its logits
start the answer.

Hashes are SHA-256 over the previous block's hash and the block's token ids (vLLM's
``sha256`` option): a collision that would hand one request another's keys and values is not a
practical concern, even from a client choosing its prompts.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass

__all__ = ["PrefixCache", "Allocation", "DEFAULT_BLOCK_SIZE"]

#: Tokens per block (vLLM's default block size).
DEFAULT_BLOCK_SIZE = 16


@dataclass(frozen=True)
class Allocation:
    """Where a new sequence goes: its ``slot``, how many leading prompt tokens already have keys
    and values there (``cached_tokens``), and the slot to copy those rows from first (``source``;
    None when they are already in ``slot``)."""

    slot: int
    cached_tokens: int
    source: int | None


class PrefixCache:
    """The block books of a slot-based KV cache (module docstring). Not thread-safe: the engine
    calls it while holding its lock or from the stepping thread.

    Args:
        num_slots: the KV cache's slots.
        block_size: tokens per block.
    """

    def __init__(self, num_slots: int, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.num_slots = num_slots
        self._chains: list[list[bytes]] = [[] for _ in range(num_slots)]
        self._holders: dict[bytes, set[int]] = {}
        self._clock = itertools.count(1)
        self._last_used = [0] * num_slots  # 0: never used (evicted first)
        #: Prompt tokens looked up, and of those found cached (vLLM's prefix_cache_queries / _hits).
        self.queries = 0
        self.hits = 0

    def block_hashes(self, ids: list[int], num_tokens: int | None = None) -> list[bytes]:
        """The chained hashes of the full blocks of ``ids[:num_tokens]``."""
        n = len(ids) if num_tokens is None else num_tokens
        out: list[bytes] = []
        prev = b""
        bs = self.block_size
        for start in range(0, n - n % bs, bs):
            h = hashlib.sha256(prev)
            h.update(",".join(map(str, ids[start:start + bs])).encode())
            prev = h.digest()
            out.append(prev)
        return out

    def _longest(self, hashes: list[bytes]) -> tuple[int, set[int]]:
        """(number of leading blocks cached somewhere, the slots that hold all of them)."""
        best, holders = 0, set()
        for i, h in enumerate(hashes):
            slots = self._holders.get(h)
            if not slots:
                break
            best, holders = i + 1, slots
        return best, holders

    def allocate(self, prompt_ids: list[int], free_slots: list[int], *, reuse: bool = True) -> Allocation:
        """Choose a free slot for a new sequence and the cached prefix it starts from (module
        docstring). ``reuse=False`` (a sequence that needs every prompt position computed, e.g. for
        prompt log-probabilities) only picks the least recently used slot. The slot's chain is cut
        to the blocks it keeps; the caller copies the rows (if ``source``) and prefills the rest,
        then calls :meth:`record`."""
        hashes = self.block_hashes(prompt_ids) if reuse else []
        blocks, holders = self._longest(hashes)
        # always recompute at least the last prompt token (its logits start the answer)
        cached = min(blocks * self.block_size, len(prompt_ids) - 1) if blocks else 0
        in_place = [s for s in free_slots if s in holders]
        if cached and in_place:
            slot, source = min(in_place, key=lambda s: self._last_used[s]), None
        else:
            slot = min(free_slots, key=lambda s: self._last_used[s])
            source = min(holders, key=lambda s: self._last_used[s]) if cached else None
        if reuse:
            self.queries += len(prompt_ids)
            self.hits += cached
        self._truncate(slot, cached // self.block_size)
        if source is not None:
            self._set_chain(slot, self._chains[source][:cached // self.block_size])
        self._last_used[slot] = next(self._clock)
        return Allocation(slot, cached, source)

    def record(self, slot: int, ids: list[int], num_tokens: int) -> None:
        """The slot now holds the keys and values of ``ids[:num_tokens]``: index its full blocks."""
        self._set_chain(slot, self.block_hashes(ids, num_tokens))
        self._last_used[slot] = next(self._clock)

    def drop(self, slot: int) -> None:
        """Forget what ``slot`` holds (its entries were cleared or are unknown)."""
        self._truncate(slot, 0)
        self._last_used[slot] = 0

    def clear(self) -> None:
        """Forget every slot."""
        for slot in range(self.num_slots):
            self.drop(slot)

    def cached_blocks(self, slot: int) -> int:
        """Full blocks indexed for ``slot``."""
        return len(self._chains[slot])

    def _truncate(self, slot: int, keep: int) -> None:
        chain = self._chains[slot]
        for h in chain[keep:]:
            holders = self._holders.get(h)
            if holders is not None:
                holders.discard(slot)
                if not holders:
                    del self._holders[h]
        del chain[keep:]

    def _set_chain(self, slot: int, hashes: list[bytes]) -> None:
        chain = self._chains[slot]
        keep = 0
        while keep < min(len(chain), len(hashes)) and chain[keep] == hashes[keep]:
            keep += 1
        self._truncate(slot, keep)
        for h in hashes[keep:]:
            chain.append(h)
            self._holders.setdefault(h, set()).add(slot)
