"""Paged KV cache: a pool of fixed-size pages per model, sequences as page tables with explicit positions.

Keys are stored already rotated (RoPE) at their position. Pages are refcounted so a sequence can
share another's prefix (fork, prefix cache); a page is copied before it is written when shared.
Pruning a span compacts the sequence (the tail moves into the gap) and re-positions the tail by
re-rotating its keys, so positions stay dense and freed pages return to the pool (TIM/TIMRUN).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from agentrt.errors import KVCacheError

__all__ = ["KVPool", "KVSequence", "OutOfPagesError"]

log = logging.getLogger(__name__)


class OutOfPagesError(KVCacheError):
    """No free page is left; the engine preempts a sequence or reports the cache as too small."""


@dataclass(eq=False)
class KVSequence:
    """One sequence's view of the pool: pages in order, `length` tokens, a position per token."""

    pages: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    # Positions are 0..length-1 and every cached key is the plain prefix of the token stream:
    # only such pages may enter the prefix cache.
    canonical: bool = True
    num_hashed: int = 0  # pages already registered in the prefix cache
    page_hash: int = 0  # rolling hash of the registered pages
    freed: bool = False

    @property
    def length(self) -> int:
        return len(self.positions)


class KVPool:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_pages: int, page_size: int = 16,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> None:
        if num_pages < 1 or page_size < 1:
            raise KVCacheError("num_pages and page_size must be positive")
        self.page_size = page_size
        self.num_pages = num_pages
        shape = (num_layers, num_pages * page_size, num_kv_heads, head_dim)
        # zeros, not empty: padded (masked) gathers must never read NaN
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.refcount = [0] * num_pages
        self._free: list[int] = list(range(num_pages - 1, -1, -1))
        # prefix cache: chain hash -> page, and the unreferenced cached pages in LRU order
        self._by_hash: dict[int, int] = {}
        self._hash_of: dict[int, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self.prefix_hit_tokens = 0  # tokens whose K/V new sequences took from the prefix cache

    # --- page accounting -------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Pages a new sequence can take: free ones plus unreferenced prefix-cache pages."""
        return len(self._free) + len(self._evictable)

    @property
    def num_in_use(self) -> int:
        return self.num_pages - self.num_free

    def _alloc_page(self) -> int:
        if self._free:
            page = self._free.pop()
        elif self._evictable:
            page, _ = self._evictable.popitem(last=False)
            self._uncache(page)
        else:
            raise OutOfPagesError(f"KV cache full: all {self.num_pages} pages of {self.page_size} tokens in use")
        self.refcount[page] = 1
        return page

    def _incref(self, page: int) -> None:
        if self.refcount[page] == 0:
            self._evictable.pop(page, None)
        self.refcount[page] += 1

    def _decref(self, page: int) -> None:
        if self.refcount[page] <= 0:
            raise KVCacheError(f"page {page} released twice")
        self.refcount[page] -= 1
        if self.refcount[page] == 0:
            if page in self._hash_of:
                self._evictable[page] = None
            else:
                self._free.append(page)

    def _uncache(self, page: int) -> None:
        h = self._hash_of.pop(page, None)
        if h is not None and self._by_hash.get(h) == page:
            del self._by_hash[h]

    def _make_private(self, seq: KVSequence, index: int) -> None:
        """Copy-on-write: give `seq` its own copy of its index-th page before writing into it."""
        page = seq.pages[index]
        if self.refcount[page] == 1:
            self._uncache(page)  # we are about to change it: it no longer matches its hash
            return
        new = self._alloc_page()
        self.k[:, self._page_slots(new)] = self.k[:, self._page_slots(page)]
        self.v[:, self._page_slots(new)] = self.v[:, self._page_slots(page)]
        self._decref(page)
        seq.pages[index] = new

    def _page_slots(self, page: int) -> slice:
        return slice(page * self.page_size, (page + 1) * self.page_size)

    # --- sequences -----------------------------------------------------------------------------
    def slots(self, seq: KVSequence, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Pool slot of each token in [start, end) of `seq`: [end - start] long."""
        end = seq.length if end is None else end
        idx = torch.arange(start, end)
        pages = torch.tensor(seq.pages, dtype=torch.long)
        return pages[idx // self.page_size] * self.page_size + idx % self.page_size

    def pages_needed(self, seq: KVSequence, n: int) -> int:
        return max(0, -(-(seq.length + n) // self.page_size) - len(seq.pages))

    def append(self, seq: KVSequence, n: int, positions: list[int] | None = None) -> torch.Tensor:
        """Reserve room for n more tokens; returns their slots. Positions default to continuing on."""
        self.reserve(seq, n, positions)
        return self.slots(seq, seq.length - n, seq.length)

    def reserve(self, seq: KVSequence, n: int, positions: list[int] | None = None) -> None:
        """`append` without building the slot tensor (the engine's per-step path)."""
        if seq.freed:
            raise KVCacheError("append to a freed sequence")
        need = self.pages_needed(seq, n)
        if need > self.num_free:
            raise OutOfPagesError(f"KV cache full: {need} more pages needed, {self.num_free} free")
        if seq.pages and seq.length % self.page_size:
            self._make_private(seq, len(seq.pages) - 1)
        for _ in range(need):
            seq.pages.append(self._alloc_page())
        start = seq.length
        if positions is None:
            nxt = seq.positions[-1] + 1 if seq.positions else 0
            positions = list(range(nxt, nxt + n))
        elif len(positions) != n:
            raise KVCacheError(f"{n} tokens but {len(positions)} positions")
        if positions != list(range(start, start + n)):
            seq.canonical = False
        seq.positions.extend(positions)

    def truncate(self, seq: KVSequence, length: int) -> None:
        """Drop tokens from the end (undoing an append), releasing pages past the new end."""
        del seq.positions[length:]
        keep = -(-length // self.page_size)
        for page in seq.pages[keep:]:
            self._decref(page)
        del seq.pages[keep:]
        seq.num_hashed = min(seq.num_hashed, length // self.page_size)

    def fork(self, seq: KVSequence) -> KVSequence:
        """A new sequence with the same contents: full pages shared, the partial last page copied."""
        child = KVSequence(pages=list(seq.pages), positions=list(seq.positions), canonical=seq.canonical,
                           num_hashed=seq.num_hashed, page_hash=seq.page_hash)
        for page in child.pages:
            self._incref(page)
        if child.length % self.page_size:
            self._make_private(child, len(child.pages) - 1)
        return child

    def free(self, seq: KVSequence) -> None:
        if seq.freed:
            return
        for page in seq.pages:
            self._decref(page)
        seq.pages.clear()
        seq.positions.clear()
        seq.freed = True

    # --- pruning and re-positioning (thread mode) -------------------------------------------
    def reposition(self, seq: KVSequence, start: int, end: int, delta: int | Sequence[int], rotary) -> None:
        """Move tokens [start, end) by `delta` positions (one for all, or one per token), re-rotating their
        cached keys (no recompute)."""
        if not 0 <= start <= end <= seq.length:
            raise KVCacheError(f"span [{start}, {end}) outside a sequence of {seq.length} tokens")
        deltas = [delta] * (end - start) if isinstance(delta, int) else list(delta)
        if len(deltas) != end - start:
            raise KVCacheError(f"{len(deltas)} deltas for a span of {end - start} tokens")
        if not any(deltas):
            return
        for i in range(start // self.page_size, (end - 1) // self.page_size + 1):
            self._make_private(seq, i)
        slots = self.slots(seq, start, end)
        d = torch.tensor(deltas, device=self.k.device)
        # k[:, slots]: [L, n, KV, D], rotated for every layer at once
        self.k[:, slots] = rotary.rotate_by(self.k[:, slots].float(), d).to(self.k.dtype)
        for i, moved in zip(range(start, end), deltas):
            seq.positions[i] += moved
        seq.canonical = False

    def prune(self, seq: KVSequence, start: int, end: int, rotary=None) -> None:
        """Remove tokens [start, end): the tail moves into the gap and its pages shrink.

        With `rotary`, the tail is also re-positioned to close the position gap (dense positions);
        without it, the tail keeps its positions.
        """
        if not 0 <= start <= end <= seq.length:
            raise KVCacheError(f"span [{start}, {end}) outside a sequence of {seq.length} tokens")
        n, tail = end - start, seq.length - end
        if n == 0:
            return
        if tail:
            for i in range(start // self.page_size, (seq.length - 1) // self.page_size + 1):
                self._make_private(seq, i)
            src, dst = self.slots(seq, end, seq.length), self.slots(seq, start, start + tail)
            self.k[:, dst] = self.k[:, src]
            self.v[:, dst] = self.v[:, src]
        kept_positions = seq.positions[:start] + seq.positions[end:]
        self.truncate(seq, seq.length - n)
        seq.positions[:] = kept_positions
        seq.canonical = False
        if rotary is not None and tail:
            gap = kept_positions[start] - (kept_positions[start - 1] + 1 if start else 0)
            self.reposition(seq, start, seq.length, -gap, rotary)

    # --- prefix cache ------------------------------------------------------------------------
    @staticmethod
    def _chain(prev: int, tokens: list[int]) -> int:
        return hash((prev, tuple(tokens)))

    def register_prefix(self, seq: KVSequence, token_ids: list[int]) -> None:
        """Offer `seq`'s full pages (whose K/V are written) to the prefix cache; token_ids = its tokens."""
        if not seq.canonical:
            return
        full = min(len(token_ids), seq.length) // self.page_size
        while seq.num_hashed < full:
            i = seq.num_hashed
            h = self._chain(seq.page_hash, token_ids[i * self.page_size:(i + 1) * self.page_size])
            page = seq.pages[i]
            if h not in self._by_hash and page not in self._hash_of:
                self._by_hash[h] = page
                self._hash_of[page] = h
            seq.page_hash, seq.num_hashed = h, i + 1

    def match_prefix(self, token_ids: list[int]) -> KVSequence:
        """A new sequence holding the longest cached prefix of `token_ids` (at least one token left over)."""
        seq = KVSequence()
        usable = (len(token_ids) - 1) // self.page_size
        h = 0
        for i in range(usable):
            h = self._chain(h, token_ids[i * self.page_size:(i + 1) * self.page_size])
            page = self._by_hash.get(h)
            if page is None:
                break
            self._incref(page)
            seq.pages.append(page)
            seq.positions.extend(range(i * self.page_size, (i + 1) * self.page_size))
            seq.page_hash, seq.num_hashed = h, i + 1
        self.prefix_hit_tokens += seq.length
        return seq
