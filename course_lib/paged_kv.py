"""A paged KV cache: fixed-size blocks from a free list, a block table per sequence, shared prefixes.

A contiguous cache gives every sequence a slab of ``max_len`` slots up front,
because it cannot know how long the answer will be; most of that slab stays
empty. vLLM's PagedAttention stores keys and values in fixed-size *blocks*
(``block_size`` tokens each) instead, and keeps a *block table* per sequence:
logical block i of the sequence lives in physical block ``table[i]``. A block is
taken from a free list only when the sequence's previous block is full, so a
sequence wastes at most ``block_size - 1`` slots, and a finished sequence hands
its blocks straight back.

Blocks also make **prefix caching** cheap: a full block is identified by every
token up to its end, so two requests whose prompts start with the same system
prompt map those blocks to the *same* physical blocks (a reference count says
how many sequences use one). The second request skips the prefill of the shared
part: its keys and values are already there.

Attention here gathers each sequence's blocks into a padded batch before the
usual SDPA call (``index_select`` through the block tables); vLLM's kernel reads
the blocks in place instead. The gather costs an extra copy of the cache per
step, the bookkeeping is the same. With ``kv_quant`` the blocks hold 8- or 4-bit codes and their scales
(:mod:`course_lib.kv_quant`): a block holds the same tokens in a fraction of the bytes, and the gathered rows
are dequantized before attention.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

import torch

from ._checks import check_int
from .kv_quant import KVQuantConfig, QuantizedKV, kv_bytes_per_token

log = logging.getLogger(__name__)


class OutOfBlocks(RuntimeError):
    """The free list is empty: admit fewer sequences or give the cache more blocks."""


class BlockAllocator:
    """Physical KV blocks: a free list, a reference count per block, and the prefix-cache index.

    A block with reference count 0 is free. A free block that holds a cached prefix keeps its index
    entry until it is handed out again (freed blocks go to the *back* of the list, so cached
    prefixes survive as long as possible), and a lookup can revive it.
    """

    def __init__(self, num_blocks: int, block_size: int):
        check_int("num_blocks", num_blocks, 1, " (physical KV blocks in the pool)")
        check_int("block_size", block_size, 1, " (tokens per block, e.g. 16)")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free: deque[int] = deque(range(num_blocks))
        self.ref = [0] * num_blocks
        self.key_of: dict[int, tuple[int, ...]] = {}  # block -> the token prefix it completes
        self.by_key: dict[tuple[int, ...], int] = {}
        self.allocations = 0  # blocks handed out fresh
        self.hits = 0  # blocks reused from the prefix cache instead of being computed again
        self.peak_used = 0

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def used(self) -> int:
        """Blocks some sequence holds now."""
        return self.num_blocks - len(self.free)

    def allocate(self) -> int:
        """A fresh block (reference count 1); raises :class:`OutOfBlocks` when none is free."""
        if not self.free:
            raise OutOfBlocks(f"all {self.num_blocks} KV blocks are in use; give the cache more blocks "
                              "(ServeConfig(kv_blocks=...)) or admit fewer requests at once (max_batch)")
        b = self.free.popleft()
        old = self.key_of.pop(b, None)
        if old is not None:  # its cached prefix is overwritten now: forget it
            del self.by_key[old]
        self.ref[b] = 1
        self.allocations += 1
        self.peak_used = max(self.peak_used, self.used)
        return b

    def release(self, block: int) -> None:
        """Drop one reference; at zero the block goes back to the free list."""
        if not 0 <= block < self.num_blocks or self.ref[block] == 0:
            raise ValueError(f"block {block} is not in use (freed twice, or never allocated)")
        self.ref[block] -= 1
        if self.ref[block] == 0:
            self.free.append(block)

    def lookup(self, key: tuple[int, ...]) -> int | None:
        """The block that already holds the prefix ``key`` (one more reference), or None."""
        b = self.by_key.get(key)
        if b is None:
            return None
        if self.ref[b] == 0:  # cached but free: take it back off the free list
            self.free.remove(b)
        self.ref[b] += 1
        self.hits += 1
        self.peak_used = max(self.peak_used, self.used)
        return b

    def register(self, key: tuple[int, ...], block: int) -> None:
        """Remember that ``block`` holds the full prefix ``key`` (the first holder wins)."""
        if key not in self.by_key and block not in self.key_of:
            self.by_key[key] = block
            self.key_of[block] = key


@dataclass
class _Seq:
    table: list[int] = field(default_factory=list)  # physical block of each logical block
    tokens: list[int] = field(default_factory=list)  # tokens whose K/V are stored, in order
    registered: int = 0  # full blocks already in the prefix index


class PagedKVCache:
    """Keys and values of many sequences in one pool of blocks, addressed through block tables.

    Used with :class:`course_lib.scratch_llama.ScratchLlama`: :meth:`begin` prepares one forward pass over some
    sequences (allocating blocks for the new tokens and the gather/scatter indices), the model then calls
    :meth:`write` once per layer, and :meth:`commit` records the tokens. Rows are laid out right-aligned:
    every row's new tokens sit at the same slots, earlier slots of a shorter row are masked.
    """

    def __init__(self, shape, num_blocks: int, block_size: int, dtype: torch.dtype, device, prefix_cache: bool = True,
                 kv_quant: KVQuantConfig | None = None):
        self.alloc = BlockAllocator(num_blocks, block_size)
        self.block_size = block_size
        self.prefix_cache = prefix_cache
        self.dtype, self.kv_quant = dtype, kv_quant
        size = (num_blocks * block_size, shape.n_kv_heads, shape.head_dim)
        if kv_quant is None:
            self.k = [torch.zeros(size, dtype=dtype, device=device) for _ in range(shape.n_layers)]
            self.v = [torch.zeros(size, dtype=dtype, device=device) for _ in range(shape.n_layers)]
        else:  # blocks of 8- or 4-bit codes with their scales; dequantized after the gather
            if not isinstance(kv_quant, KVQuantConfig):
                raise ValueError(f"kv_quant must be a KVQuantConfig (e.g. KVQuantConfig(bits=8)) or None, got "
                                 f"{kv_quant!r}")
            self.k = [QuantizedKV.empty(size, kv_quant, device) for _ in range(shape.n_layers)]
            self.v = [QuantizedKV.empty(size, kv_quant, device) for _ in range(shape.n_layers)]
        self.bytes_per_token = kv_bytes_per_token(shape, kv_quant, dtype)
        self.seqs: dict[int, _Seq] = {}
        self.length = 0  # what ScratchLlama reads as "slots before the new tokens" during a pass
        self._pass: tuple | None = None

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size

    def used_bytes(self) -> int:
        """Memory in blocks that some sequence holds now."""
        return self.alloc.used * self.bytes_per_block

    def stored_tokens(self, sid: int) -> int:
        return len(self.seqs[sid].tokens)

    def add(self, sid: int, prompt: tuple[int, ...]) -> int:
        """Start sequence ``sid``; with prefix caching, map the prompt's already-cached full blocks.

        Returns how many prompt tokens are already stored (a multiple of ``block_size``; at least the last
        prompt token is always left to compute, since its logits give the first new token).
        """
        if sid in self.seqs:
            raise ValueError(f"sequence {sid} is already in the cache")
        seq = self.seqs[sid] = _Seq()
        if not self.prefix_cache:
            return 0
        bs = self.block_size
        for i in range((len(prompt) - 1) // bs):
            b = self.alloc.lookup(tuple(prompt[: (i + 1) * bs]))
            if b is None:
                break
            seq.table.append(b)
            seq.tokens.extend(prompt[i * bs:(i + 1) * bs])
            seq.registered += 1
        return len(seq.tokens)

    def free(self, sid: int) -> None:
        """Release every block of a finished sequence."""
        for b in self.seqs.pop(sid).table:
            self.alloc.release(b)

    def begin(self, sids: list[int], n_new: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Prepare one pass in which each of ``sids`` adds ``n_new`` tokens: (RoPE positions, key mask).

        Allocates blocks for the new tokens, then builds the gather index (each row's stored slots,
        right-aligned, then its new slots) and the scatter index (where the new K/V go).
        """
        bs, dev = self.block_size, self.k[0].device
        lens = [len(self.seqs[s].tokens) for s in sids]
        for s, n in zip(sids, lens):
            table = self.seqs[s].table
            while len(table) * bs < n + n_new:
                table.append(self.alloc.allocate())
        past = max(lens)
        gather = torch.zeros(len(sids), past + n_new, dtype=torch.long)
        key_mask = torch.zeros(len(sids), past + n_new, dtype=torch.bool)
        for r, (s, n) in enumerate(zip(sids, lens)):
            table = torch.tensor(self.seqs[s].table)
            logical = torch.arange(n + n_new)
            gather[r, past - n:] = table[logical // bs] * bs + logical % bs
            key_mask[r, past - n:] = True
        self.length = past
        self._pass = (gather.to(dev), gather[:, past:].reshape(-1).to(dev), len(sids), n_new)
        positions = torch.tensor(lens)[:, None] + torch.arange(n_new)[None, :]
        return positions.to(dev), key_mask.to(dev)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Called by the model: store this pass's (B, H, T, D) keys/values, return every row's (B, H, S, D)."""
        gather, scatter, b, t = self._pass
        self.k[layer].index_copy_(0, scatter, k.transpose(1, 2).reshape(b * t, *k.shape[1:2], k.shape[-1]))
        self.v[layer].index_copy_(0, scatter, v.transpose(1, 2).reshape(b * t, *v.shape[1:2], v.shape[-1]))
        return self._read(self.k[layer][gather]).transpose(1, 2), self._read(self.v[layer][gather]).transpose(1, 2)

    def _read(self, t):
        return t if self.kv_quant is None else t.dequantize(self.dtype)

    def commit(self, sids: list[int], new_tokens: list[list[int]]) -> None:
        """The pass ran: record each row's new tokens and index the blocks that became full."""
        bs = self.block_size
        for s, toks in zip(sids, new_tokens):
            seq = self.seqs[s]
            seq.tokens.extend(toks)
            while self.prefix_cache and (seq.registered + 1) * bs <= len(seq.tokens):
                end = (seq.registered + 1) * bs
                self.alloc.register(tuple(seq.tokens[:end]), seq.table[seq.registered])
                seq.registered += 1
        self._pass = None
