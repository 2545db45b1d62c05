"""A partition's delivered, not yet settled messages, in stream order.

The partition consumer hands out up to ``batch_size`` messages before any is acked
(``max_ack_pending``). The worker keeps them here until each is settled (acked after
its commit, dead-lettered, or handed back), and only ever works from the head: an
event that must wait (NAK'd with a delay, held for the breaker) keeps everything
behind it waiting too, just as a single in-flight event held its partition. Entries
are keyed by stream sequence, so a redelivery replaces its old entry and lands in its
place whatever order the server sends things in.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from nats.aio.msg import Msg

from order_sidecar_client.consumer.event import EntityEvent, MalformedEvent, parse_msg


@dataclass
class Held:
    """One delivered message: its event, or why it is malformed."""

    msg: Msg
    event: EntityEvent | None
    malformed: str = ""
    #: NAK'd with a delay: the server redelivers it. Not applied, not heartbeated (an
    #: in-progress ack would reset the delay to a whole ack wait) until it comes back.
    nakked: bool = False

    @property
    def stream_sequence(self) -> int:
        """Its sequence in the entity stream."""
        return int(self.msg.metadata.sequence.stream)


class Window:
    """The unsettled messages of one partition, ordered by stream sequence."""

    def __init__(self) -> None:
        self._held: dict[int, Held] = {}

    def __len__(self) -> int:
        return len(self._held)

    def __iter__(self) -> Iterator[Held]:
        """The entries in stream order (a snapshot: settling while iterating is fine)."""
        return iter([self._held[seq] for seq in sorted(self._held)])

    def add(self, msg: Msg) -> Held:
        """Take a delivery in; a redelivery replaces the entry of its stream sequence."""
        try:
            held = Held(msg, parse_msg(msg))
        except MalformedEvent as error:
            held = Held(msg, None, str(error))
        self._held[held.stream_sequence] = held
        return held

    def head(self) -> Held | None:
        """The first unsettled message, if any."""
        return self._held[min(self._held)] if self._held else None

    def head_is_ready(self) -> bool:
        """Whether there is a head to work on now (it is not awaiting its redelivery)."""
        head = self.head()
        return head is not None and not head.nakked

    def ready_run(self, limit: int) -> list[Held]:
        """Up to *limit* events from the head on, stopping before the first entry that is
        malformed or NAK'd: the events one transaction may take, in stream order."""
        run: list[Held] = []
        for held in self:
            if len(run) == limit or held.event is None or held.nakked:
                break
            run.append(held)
        return run

    def settle(self, held: Held) -> None:
        """Forget *held*: acked, dead-lettered or handed back."""
        if self._held.get(held.stream_sequence) is held:
            del self._held[held.stream_sequence]
