"""Allocation of KV blocks to sequences, with reference counts so that blocks can be shared."""

from __future__ import annotations

from collections import deque


class OutOfBlocksError(RuntimeError):
    """Not enough free KV blocks; callers queue, preempt or refuse, never overwrite."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) <= len(self._free)

    def allocate(self, num_tokens: int) -> list[int]:
        """Fresh blocks for `num_tokens` slots; raises OutOfBlocksError and takes nothing if they do not fit."""
        n = self.blocks_needed(num_tokens)
        if n > len(self._free):
            raise OutOfBlocksError(f"need {n} KV blocks, {len(self._free)} free of {self.num_blocks}")
        blocks = [self._free.popleft() for _ in range(n)]
        for b in blocks:
            self.ref_counts[b] = 1
        return blocks

    def grow(self, block_table: list[int], num_tokens: int) -> bool:
        """Extend `block_table` in place to hold `num_tokens` slots. False (and no change) if blocks ran out."""
        missing = self.blocks_needed(num_tokens) - len(block_table)
        if missing <= 0:
            return True
        if missing > len(self._free):
            return False
        block_table.extend(self.allocate(missing * self.block_size))
        return True

    def share(self, block_table: list[int]) -> list[int]:
        """Another reference to the same blocks (a fork or a shared prefix)."""
        for b in block_table:
            if self.ref_counts[b] <= 0:
                raise ValueError(f"block {b} is not allocated")
            self.ref_counts[b] += 1
        return list(block_table)

    def free(self, block_table: list[int]) -> None:
        """Drop one reference to each block; a block returns to the pool when nobody holds it."""
        for b in reversed(block_table):
            if self.ref_counts[b] <= 0:
                raise ValueError(f"double free of KV block {b}")
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self._free.append(b)
        block_table.clear()
