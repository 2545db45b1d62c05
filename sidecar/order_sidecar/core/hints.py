"""Where entities stood when this sidecar last wrote them: a bounded cache of guesses.

A guess saves reading the entity's last event before the next append. It is never
trusted: the append carries it as its expected last subject sequence, so a stale guess
is refused by the broker and re-read, exactly like a lost race.
"""

from __future__ import annotations

from collections import OrderedDict

from order_sidecar.core.model import EntityPosition


class PositionHints:
    """Least-recently-used positions of entities whose gates were let go."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._positions: OrderedDict[str, EntityPosition] = OrderedDict()

    def __len__(self) -> int:
        return len(self._positions)

    def remember(self, key: str, position: EntityPosition) -> None:
        """Keep *position* as *key*'s guess, dropping the oldest guess when full."""
        if self._capacity <= 0:
            return
        self._positions[key] = position
        self._positions.move_to_end(key)
        while len(self._positions) > self._capacity:
            self._positions.popitem(last=False)

    def take(self, key: str) -> EntityPosition | None:
        """Remove and return *key*'s guess (the gate holds it from now on)."""
        return self._positions.pop(key, None)
