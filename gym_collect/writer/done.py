"""Which (task, rollout) pairs are in the output: one bit each over the selection's task range, and a set
for the pairs outside it (sparse caller-stamped task indices, many rollouts of a duplicated line)."""

from __future__ import annotations


class DoneSet:
    """A set of (task, rollout) pairs.

    Pairs with `first_task <= task < first_task + num_tasks` and `0 <= rollout < rollouts_per_task` take one
    bit each (1M tasks x 4 rollouts: 500 KB); any other pair goes to an exact overflow set.
    """

    def __init__(self, first_task: int, num_tasks: int, rollouts_per_task: int) -> None:
        self.first_task, self.num_tasks = first_task, max(0, num_tasks)
        self.rollouts_per_task = max(1, rollouts_per_task)
        self._bits = bytearray((self.num_tasks * self.rollouts_per_task + 7) // 8)
        self._overflow: set[tuple[int, int]] = set()
        self.count = 0

    def _bit(self, task: int, rollout: int) -> int | None:
        offset = task - self.first_task
        if not (0 <= offset < self.num_tasks and 0 <= rollout < self.rollouts_per_task):
            return None
        return offset * self.rollouts_per_task + rollout

    def add(self, task: int, rollout: int) -> bool:
        """Mark a pair done; False when it was done already."""
        bit = self._bit(task, rollout)
        if bit is None:
            if (task, rollout) in self._overflow:
                return False
            self._overflow.add((task, rollout))
        elif self._bits[bit >> 3] & (1 << (bit & 7)):
            return False
        else:
            self._bits[bit >> 3] |= 1 << (bit & 7)
        self.count += 1
        return True

    def __contains__(self, pair: tuple[int, int]) -> bool:
        bit = self._bit(*pair)
        if bit is None:
            return pair in self._overflow
        return bool(self._bits[bit >> 3] & (1 << (bit & 7)))

    def is_done(self, task: int, rollout: int) -> bool:
        """True when (task, rollout) is finished."""
        return (task, rollout) in self
