"""Which (task, rollout) pairs of the selection are in the output: one bit each."""

from __future__ import annotations


class DoneSet:
    """Which (task, rollout) pairs of the selection are finished: one bit each, so 1M rows x 4 repeats
    take 500 KB. Tasks are `[start_idx, start_idx + num_rows)`, rollouts `[0, num_repeats)`."""

    def __init__(self, start_idx: int, num_rows: int, num_repeats: int) -> None:
        self.start_idx, self.num_rows, self.num_repeats = start_idx, num_rows, num_repeats
        self._bits = bytearray((num_rows * num_repeats + 7) // 8)
        self.count = 0

    @property
    def expected(self) -> int:
        """How many pairs the selection holds."""
        return self.num_rows * self.num_repeats

    @property
    def complete(self) -> bool:
        """True when every pair of the selection is done."""
        return self.count == self.expected

    def _bit(self, task: int, rollout: int) -> int | None:
        offset = task - self.start_idx
        if not (0 <= offset < self.num_rows and 0 <= rollout < self.num_repeats):
            return None
        return offset * self.num_repeats + rollout

    def add(self, task: int, rollout: int) -> bool:
        """Mark a pair done; False when it was done already or lies outside the selection."""
        bit = self._bit(task, rollout)
        if bit is None or self._bits[bit >> 3] & (1 << (bit & 7)):
            return False
        self._bits[bit >> 3] |= 1 << (bit & 7)
        self.count += 1
        return True

    def __contains__(self, pair: tuple[int, int]) -> bool:
        bit = self._bit(*pair)
        return bit is not None and bool(self._bits[bit >> 3] & (1 << (bit & 7)))

    def is_done(self, task: int, rollout: int) -> bool:
        """True when (task, rollout) is finished."""
        return (task, rollout) in self
