"""Where entities stood when this sidecar last wrote them: a bounded cache of guesses.

A guess saves reading the entity's last event before the next append. It is never
trusted: the append carries it as its expected last subject sequence, so a stale guess
is refused by the broker and re-read, exactly like a lost race. A decision that refuses
a caller (a stale version, an unexpected sequence) is always taken on a fresh read from
the stream leader, so a guess keeps only what the append and that check need.
"""

from __future__ import annotations

from order_sidecar.core.model import EntityPosition

# (Entity-Sequence, stream sequence, Entity-Version): about a third of an EntityPosition's
# memory, which matters at 100,000 remembered entities per sidecar.
_Guess = tuple[int, int, int | None]


class PositionHints:
    """Least-recently-used positions of entities whose gates were let go."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        # A dict keeps insertion order: re-inserting moves a key to the end (newest).
        self._guesses: dict[str, _Guess] = {}

    def __len__(self) -> int:
        return len(self._guesses)

    def remember(self, key: str, position: EntityPosition) -> None:
        """Keep *position* as *key*'s guess, dropping the oldest guess when full."""
        if self._capacity <= 0:
            return
        self._guesses.pop(key, None)
        self._guesses[key] = (position.sequence, position.stream_sequence, position.version)
        while len(self._guesses) > self._capacity:
            del self._guesses[next(iter(self._guesses))]

    def take(self, key: str) -> EntityPosition | None:
        """Remove and return *key*'s guess (the gate holds it from now on)."""
        guess = self._guesses.pop(key, None)
        return None if guess is None else EntityPosition(*guess)
