"""BlockManager: allocation, reference counts, growth and running out, plus a stateful property test."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from sunray.engine.block_manager import BlockManager, OutOfBlocksError


def test_blocks_needed_rounds_up():
    bm = BlockManager(8, 4)
    assert [bm.blocks_needed(n) for n in (0, 1, 3, 4, 5, 8, 9)] == [0, 1, 1, 1, 2, 2, 3]


def test_allocate_and_free():
    bm = BlockManager(8, 4)
    a = bm.allocate(5)  # 2 blocks
    b = bm.allocate(4)  # 1 block
    assert len(a) == 2 and len(b) == 1
    assert len(set(a) | set(b)) == 3
    assert bm.num_free_blocks == 5 and bm.num_used_blocks == 3
    assert all(bm.ref_counts[x] == 1 for x in a + b)
    bm.free(a)
    assert a == []  # free clears the caller's table
    assert bm.num_free_blocks == 7 and bm.num_used_blocks == 1
    bm.free(b)
    assert bm.num_free_blocks == 8
    assert bm.ref_counts == [0] * 8


def test_allocate_zero_tokens_takes_nothing():
    bm = BlockManager(4, 4)
    assert bm.allocate(0) == []
    assert bm.num_free_blocks == 4


def test_share_keeps_blocks_until_last_reference_is_dropped():
    bm = BlockManager(6, 4)
    a = bm.allocate(8)
    blocks = list(a)
    b = bm.share(a)
    assert b == a and b is not a
    assert all(bm.ref_counts[x] == 2 for x in blocks)
    bm.free(a)
    assert bm.num_free_blocks == 4  # still held by b
    assert all(bm.ref_counts[x] == 1 for x in blocks)
    # The shared blocks are not handed out again while b holds them.
    fresh = bm.allocate(16)
    assert not set(fresh) & set(blocks)
    bm.free(b)
    assert bm.num_free_blocks == 2
    bm.free(fresh)
    assert bm.num_free_blocks == 6


def test_double_free_raises():
    bm = BlockManager(4, 4)
    a = bm.allocate(4)
    stale = list(a)
    bm.free(a)
    with pytest.raises(ValueError, match="double free of KV block"):
        bm.free(stale)
    assert bm.num_free_blocks == 4


def test_share_of_free_block_raises():
    bm = BlockManager(4, 4)
    a = bm.allocate(4)
    stale = list(a)
    bm.free(a)
    with pytest.raises(ValueError, match="not allocated"):
        bm.share(stale)


def test_grow_in_place():
    bm = BlockManager(8, 4)
    table = bm.allocate(3)
    same = table
    first = list(table)
    assert bm.grow(table, 4)  # still one block
    assert table == first
    assert bm.grow(table, 9)  # three blocks
    assert table is same and table[:1] == first and len(table) == 3
    assert len(set(table)) == 3
    assert bm.num_free_blocks == 5
    assert bm.grow(table, 2)  # shrinking requests change nothing
    assert len(table) == 3


def test_grow_without_room_changes_nothing():
    bm = BlockManager(3, 4)
    table = bm.allocate(4)
    other = bm.allocate(4)
    before = list(table)
    assert not bm.grow(table, 13)  # needs 4 blocks in all, 3 more but only 1 free
    assert table == before
    assert bm.num_free_blocks == 1
    assert bm.grow(table, 8)
    assert bm.num_free_blocks == 0
    bm.free(table)
    bm.free(other)
    assert bm.num_free_blocks == 3


def test_out_of_blocks_takes_nothing():
    bm = BlockManager(4, 4)
    held = bm.allocate(8)
    assert not bm.can_allocate(9)
    with pytest.raises(OutOfBlocksError, match=r"need 3 KV blocks, 2 free of 4"):
        bm.allocate(9)
    assert bm.num_free_blocks == 2
    assert bm.ref_counts.count(0) == 2
    # The two free blocks are still usable after the failed call.
    rest = bm.allocate(8)
    assert set(rest).isdisjoint(held) and len(rest) == 2
    assert bm.num_free_blocks == 0


class BlockManagerMachine(RuleBasedStateMachine):
    """Random allocate/grow/share/free: the pool never loses or double-books a block."""

    NUM_BLOCKS, BLOCK_SIZE = 12, 4

    def __init__(self) -> None:
        super().__init__()
        self.bm = BlockManager(self.NUM_BLOCKS, self.BLOCK_SIZE)
        self.tables: list[list[int]] = []  # every live block table (shared ones appear several times)

    def _refs(self) -> dict[int, int]:
        refs: dict[int, int] = {}
        for t in self.tables:
            for b in t:
                refs[b] = refs.get(b, 0) + 1
        return refs

    @rule(tokens=st.integers(0, 30))
    def allocate(self, tokens):
        in_use = set(self._refs())
        free_before = self.bm.num_free_blocks
        need = self.bm.blocks_needed(tokens)
        if need > free_before:
            with pytest.raises(OutOfBlocksError):
                self.bm.allocate(tokens)
            assert self.bm.num_free_blocks == free_before
            return
        table = self.bm.allocate(tokens)
        assert len(table) == need
        assert len(set(table)) == need
        assert not set(table) & in_use, "handed out a block that is in use"
        self.tables.append(table)

    @precondition(lambda self: self.tables)
    @rule(data=st.data(), tokens=st.integers(0, 40))
    def grow(self, data, tokens):
        i = data.draw(st.integers(0, len(self.tables) - 1))
        table = self.tables[i]
        others = set()
        for j, t in enumerate(self.tables):
            if j != i:
                others.update(t)
        before = list(table)
        free_before = self.bm.num_free_blocks
        missing = max(0, self.bm.blocks_needed(tokens) - len(table))
        ok = self.bm.grow(table, tokens)
        assert ok == (missing <= free_before)
        if ok:
            assert table[: len(before)] == before
            assert len(table) == len(before) + missing
            new = table[len(before) :]
            assert not set(new) & (others | set(before)), "grow handed out a block that is in use"
            assert self.bm.num_free_blocks == free_before - missing
        else:
            assert table == before
            assert self.bm.num_free_blocks == free_before

    @precondition(lambda self: self.tables)
    @rule(data=st.data())
    def share(self, data):
        i = data.draw(st.integers(0, len(self.tables) - 1))
        free_before = self.bm.num_free_blocks
        copy = self.bm.share(self.tables[i])
        assert copy == self.tables[i]
        assert self.bm.num_free_blocks == free_before
        self.tables.append(copy)

    @precondition(lambda self: self.tables)
    @rule(data=st.data())
    def free(self, data):
        i = data.draw(st.integers(0, len(self.tables) - 1))
        table = self.tables.pop(i)
        still_held = set(self._refs())
        released = set(table) - still_held
        free_before = self.bm.num_free_blocks
        self.bm.free(table)
        assert table == []
        assert self.bm.num_free_blocks == free_before + len(released)

    @invariant()
    def accounting(self):
        refs = self._refs()
        bm = self.bm
        assert bm.num_free_blocks + bm.num_used_blocks == bm.num_blocks
        assert bm.num_used_blocks == len(refs)
        for b in range(bm.num_blocks):
            assert bm.ref_counts[b] == refs.get(b, 0)
        free = list(bm._free)
        assert len(free) == len(set(free)), "a block is twice in the free list"
        assert not set(free) & set(refs), "a block in use is in the free list"


BlockManagerMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
test_block_manager_state_machine = BlockManagerMachine.TestCase
