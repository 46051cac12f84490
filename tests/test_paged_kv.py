"""The paged KV cache: block allocation, freeing, prefix reuse, and the same attention as a contiguous cache."""

from __future__ import annotations

import pytest
import torch

from course_lib.paged_kv import BlockAllocator, OutOfBlocks, PagedKVCache
from course_lib.scratch_llama import ScratchLlama

from .conftest import make_tiny


def test_allocate_and_release_reuse_the_free_list():
    a = BlockAllocator(4, block_size=8)
    got = [a.allocate() for _ in range(4)]
    assert sorted(got) == [0, 1, 2, 3] and a.num_free == 0 and a.used == 4 and a.peak_used == 4
    with pytest.raises(OutOfBlocks, match="kv_blocks"):
        a.allocate()
    a.release(got[2])
    assert a.num_free == 1 and a.allocate() == got[2]  # a freed block is handed out again
    for b in got:
        a.release(b)
    assert a.used == 0 and a.num_free == 4 and a.allocations == 5
    with pytest.raises(ValueError, match="not in use"):
        a.release(got[0])  # a double free is an error, not a silent negative count


def test_shared_blocks_are_reference_counted():
    a = BlockAllocator(3, block_size=2)
    b = a.allocate()
    a.register((1, 2), b)
    assert a.lookup((1, 2)) == b and a.ref[b] == 2 and a.hits == 1
    assert a.lookup((9, 9)) is None and a.hits == 1
    a.release(b)
    assert a.used == 1  # still held by its second user
    a.release(b)
    assert a.used == 0
    # free but still cached: a lookup revives it instead of recomputing
    assert a.lookup((1, 2)) == b and a.used == 1 and a.num_free == 2
    a.release(b)
    # once the block is handed out for something else, its cached prefix is forgotten
    others = [a.allocate() for _ in range(3)]
    assert b in others and a.lookup((1, 2)) is None


@pytest.mark.parametrize("kwargs, match", [(dict(num_blocks=0, block_size=4), "num_blocks"),
                                           (dict(num_blocks=4, block_size=True), "block_size")])
def test_bad_allocator(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BlockAllocator(**kwargs)


def run(scratch, cache, sids, toks):
    """One pass of ``toks`` (B, T) through the paged cache; returns last-position logits."""
    positions, key_mask = cache.begin(sids, toks.shape[1])
    out = scratch(toks, cache, positions, key_mask, last_only=True)[:, -1]
    cache.commit(sids, toks.tolist())
    return out


def test_paged_attention_matches_the_plain_forward_and_shares_prefixes():
    model = make_tiny("llama", vocab=64)
    scratch = ScratchLlama(model)
    cache = PagedKVCache(scratch.shape, num_blocks=32, block_size=4, dtype=torch.float32, device="cpu",
                         prefix_cache=True)
    system = list(range(10, 19))  # 9 tokens: two full blocks of 4 and one token more
    a, b = system + [1, 2, 3], system + [5, 6]
    assert cache.add(0, tuple(a)) == 0  # nothing cached yet
    run(scratch, cache, [0], torch.tensor([a]))
    used_after_a = cache.alloc.used
    assert cache.add(1, tuple(b)) == 8  # the two full blocks of the shared system prompt
    assert cache.alloc.hits == 2 and cache.alloc.used == used_after_a  # reused, not copied
    got = run(scratch, cache, [1], torch.tensor([b[8:]]))  # only the unshared tail is computed
    with torch.no_grad():
        want = model(torch.tensor([b])).logits[0, -1]
    torch.testing.assert_close(got[0], want, rtol=1e-4, atol=1e-4)
    # a decode step over both rows (different lengths, right-aligned) matches each sequence alone
    nxt = torch.tensor([[7], [8]])
    got = run(scratch, cache, [0, 1], nxt)
    for row, (seq, tok) in enumerate(((a, 7), (b, 8))):
        with torch.no_grad():
            want = model(torch.tensor([seq + [tok]])).logits[0, -1]
        torch.testing.assert_close(got[row], want, rtol=1e-4, atol=1e-4)
    cache.free(0)
    cache.free(1)
    assert cache.alloc.used == 0  # no leak: every block is back on the free list
    with pytest.raises(ValueError, match="already"):
        cache.add(2, (1,)) or cache.add(2, (1,))
