"""``order-sidecar verify``: read a stream and check every entity's sequence.

For each entity, in stream order, its ``Entity-Sequence`` values must be exactly
1, 2, 3, ... n. The checker counts, per entity type:

- gaps: numbers in 1..max never seen;
- duplicates: events whose number was already seen;
- inversions: events whose number is lower than one seen before it (and not a duplicate);
- malformed: events without valid Entity-Type / Entity-Id / Entity-Sequence headers.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from order_sidecar_client import contract

_FETCH_BATCH = 1000


@dataclass
class TypeReport:
    """Counts for one entity type."""

    events: int = 0
    entities: int = 0
    gaps: int = 0
    duplicates: int = 0
    inversions: int = 0
    malformed: int = 0

    @property
    def violations(self) -> int:
        """Everything that breaks per-entity order."""
        return self.gaps + self.duplicates + self.inversions + self.malformed


@dataclass
class _EntityTrack:
    seen: set[int] = field(default_factory=set)
    highest: int = 0


class OrderChecker:
    """Feeds on events in stream order; reports per entity type."""

    def __init__(self) -> None:
        self._tracks: dict[tuple[str, str], _EntityTrack] = {}
        self._reports: dict[str, TypeReport] = {}

    def observe(self, headers: dict[str, str] | None) -> None:
        """Account for one message with these headers."""
        headers = headers or {}
        entity_type = headers.get(contract.HEADER_ENTITY_TYPE, "")
        entity_id = headers.get(contract.HEADER_ENTITY_ID, "")
        raw_sequence = headers.get(contract.HEADER_ENTITY_SEQUENCE, "")
        report = self._reports.setdefault(entity_type or "?", TypeReport())
        report.events += 1
        if not entity_type or not entity_id or not raw_sequence.isdigit():
            report.malformed += 1
            return
        self.observe_sequence(entity_type, entity_id, int(raw_sequence), report)

    def observe_sequence(
        self, entity_type: str, entity_id: str, sequence: int, report: TypeReport | None = None
    ) -> None:
        """Account for one event of an entity."""
        if report is None:
            report = self._reports.setdefault(entity_type, TypeReport())
            report.events += 1
        track = self._tracks.get((entity_type, entity_id))
        if track is None:
            track = self._tracks[(entity_type, entity_id)] = _EntityTrack()
            report.entities += 1
        if sequence in track.seen:
            report.duplicates += 1
        elif sequence < track.highest:
            report.inversions += 1
        track.seen.add(sequence)
        track.highest = max(track.highest, sequence)

    def report(self) -> dict[str, TypeReport]:
        """Per entity type, with gaps counted over everything observed."""
        for report in self._reports.values():
            report.gaps = 0
        for (entity_type, _), track in self._tracks.items():
            self._reports[entity_type].gaps += track.highest - len(track.seen)
        return dict(sorted(self._reports.items()))


async def read_stream(nc: NatsClient, stream: str) -> list[dict[str, str] | None]:
    """Headers of every message now in *stream*, in stream order."""
    jsm = nc.jsm()
    info = await jsm.stream_info(stream)
    last = info.state.last_seq
    collected: list[dict[str, str] | None] = []
    if info.state.messages == 0:
        return collected
    consumer = await jsm.add_consumer(
        stream,
        ConsumerConfig(
            ack_policy=AckPolicy.NONE,
            deliver_policy=DeliverPolicy.ALL,
            inactive_threshold=30.0,
            headers_only=True,
        ),
    )
    sub = await nc.jetstream().pull_subscribe_bind(consumer.name, stream=stream)
    try:
        while True:
            try:
                messages = await sub.fetch(_FETCH_BATCH, timeout=2.0)
            except nats.errors.TimeoutError:
                return collected
            for msg in messages:
                collected.append(msg.headers)
                if msg.metadata.sequence.stream >= last:
                    return collected
    finally:
        await sub.unsubscribe()
        await jsm.delete_consumer(stream, consumer.name)


async def verify_stream(nc: NatsClient, stream: str) -> dict[str, TypeReport]:
    """Check every entity in *stream*."""
    checker = OrderChecker()
    for headers in await read_stream(nc, stream):
        checker.observe(headers)
    return checker.report()


def format_table(reports: dict[str, TypeReport]) -> str:
    """A fixed-width table, one row per entity type and a total."""
    columns = ("events", "entities", "gaps", "duplicates", "inversions", "malformed")
    total = TypeReport()
    rows = []
    for name, report in reports.items():
        rows.append([name, *(str(getattr(report, c)) for c in columns)])
        for column in columns:
            setattr(total, column, getattr(total, column) + getattr(report, column))
    rows.append(["TOTAL", *(str(getattr(total, c)) for c in columns)])
    header = ["entity_type", *columns]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True))
        for row in [header, *rows]
    ]
    return "\n".join(lines)


def format_json(reports: dict[str, TypeReport]) -> str:
    """The reports as JSON."""
    return json.dumps({name: asdict(report) for name, report in reports.items()}, indent=2)
