"""``order-sidecar dlq list|replay``: inspect and re-drive consumers' dead letters.

``replay`` does not republish the dead copies into the entity stream (its per-subject
fencing and sequences forbid that); it asks the consumer that holds the entity's
partition to unblock the entity and re-read it from the stream (docs/consumers.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os

from order_sidecar_client import contract
from order_sidecar_client.consumer import DeadEntry, list_dead, request_replay

from order_sidecar.jetstream.connection import connect_nats

HELP = "list or replay events the ordered consumers dead-lettered"
DESCRIPTION = (
    "List the dead-letter stream of an ordered consumer, or ask the consumers to re-drive "
    "dead-lettered entities from the entity stream."
)


def configure(dlq: argparse.ArgumentParser) -> None:
    """Add ``dlq list`` and ``dlq replay``."""
    actions = dlq.add_subparsers(dest="dlq_command", required=True)
    for name, text in (("list", "print dead events"), ("replay", "re-drive dead entities")):
        action = actions.add_parser(name, help=text)
        action.add_argument(
            "--nats-url", default=os.environ.get("ORDER_SIDECAR_NATS_URL", "nats://127.0.0.1:4222")
        )
        action.add_argument(
            "--stream", default=os.environ.get("ORDER_SIDECAR_STREAM", "ENTITY_EVENTS")
        )
        action.add_argument("--dlq-stream", default="", help="default {stream}_DLQ")
        action.add_argument("--dlq-prefix", default="", help="default dlq.{stream}")
        action.add_argument("--entity-type", default="", help="only this entity type")
        action.add_argument("--entity-id", default="", help="only this entity id")
        if name == "list":
            action.add_argument("--json", action="store_true", help="one JSON object per line")


def run(args: argparse.Namespace) -> int:
    """Run ``dlq list`` or ``dlq replay``; the exit status."""
    return asyncio.run(_run(args))


async def _run(args: argparse.Namespace) -> int:
    dlq_stream = args.dlq_stream or f"{args.stream}_DLQ"
    prefix = args.dlq_prefix or f"dlq.{args.stream}"
    nc = await connect_nats(args.nats_url, f"order-sidecar dlq {args.dlq_command}")
    try:
        entries = [e for e in await list_dead(nc, dlq_stream, prefix) if _selected(args, e)]
        if args.dlq_command == "list":
            print(_format(entries, args.json))
            return 0
        count = await request_replay(nc.jetstream(), prefix, entries)
        print(f"replay requested for {count} entities ({len(entries)} dead events)")
        return 0
    finally:
        await asyncio.wait_for(nc.close(), 5.0)


def _selected(args: argparse.Namespace, entry: DeadEntry) -> bool:
    key = entry.key
    return (not args.entity_type or key.entity_type == args.entity_type) and (
        not args.entity_id or key.entity_id == args.entity_id
    )


def _format(entries: list[DeadEntry], as_json: bool) -> str:
    rows = [
        {
            "entity_type": e.key.entity_type,
            "entity_id": e.key.entity_id,
            "sequence": e.headers.get(contract.HEADER_ENTITY_SEQUENCE, ""),
            "stream_sequence": e.headers.get("Dlq-Stream-Sequence", ""),
            "deliveries": e.headers.get("Dlq-Deliveries", ""),
            "reason": e.headers.get("Dlq-Reason", ""),
        }
        for e in entries
    ]
    if as_json:
        return "\n".join(json.dumps(row) for row in rows)
    if not rows:
        return "no dead events"
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)
