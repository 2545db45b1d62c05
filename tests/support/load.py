"""Drive several producer processes against sidecars and check what the stream holds."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import nats.errors
from nats.aio.client import Client as NatsClient

from tests.support.helpers import StoredMessage, message_count, stream_messages
from tests.support.servers import NatsServer, RedisServer, SidecarProcess

WORKLOAD = Path(__file__).with_name("workload.py")


@dataclass
class Producers:
    """Producer processes of one run and where they write their replies."""

    workdir: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    outputs: list[Path] = field(default_factory=list)

    def start(self, mode: str, name: str, **options: str | int) -> None:
        """Start one producer process."""
        out = self.workdir / f"{name}.jsonl"
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
        log = (self.workdir / f"{name}.log").open("wb")
        self.processes.append(
            subprocess.Popen(
                [sys.executable, str(WORKLOAD), mode, f"--producer={name}", f"--out={out}", *flags],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        self.outputs.append(out)

    async def wait(self, timeout: float) -> list[int]:
        """Wait for every producer to exit; their exit codes."""
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in self.processes):
            if time.monotonic() > deadline:
                for process in self.processes:
                    process.kill()
                raise TimeoutError(f"producers still running after {timeout}s")
            await asyncio.sleep(0.1)
        return [int(p.returncode) for p in self.processes]

    def replies(self) -> list[dict[str, object]]:
        """Every reply line every producer wrote."""
        lines: list[dict[str, object]] = []
        for path in self.outputs:
            lines.extend(json.loads(line) for line in path.read_text().splitlines() if line)
        return lines

    def log_tail(self) -> str:
        """The end of each producer's log, for failure messages."""
        return "\n".join((self.workdir / f"{p.stem}.log").read_text()[-2000:] for p in self.outputs)


async def wait_for_messages(nc: NatsClient, stream: str, count: int, timeout: float) -> int:
    """Wait until *stream* holds at least *count* messages (riding out leader elections)."""
    deadline = time.monotonic() + timeout
    while (found := await _count_or_zero(nc, stream)) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"stream {stream} did not reach {count} messages in {timeout}s")
        await asyncio.sleep(0.05)
    return found


async def _count_or_zero(nc: NatsClient, stream: str) -> int:
    try:
        return await message_count(nc, stream)
    except (TimeoutError, nats.errors.Error):
        return 0  # no stream leader right now


def run_verify(nats_url: str, stream: str) -> tuple[int, dict[str, dict[str, int]]]:
    """Run ``order-sidecar verify --json``; its exit status and report."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "order_sidecar.cli",
            "verify",
            f"--nats-url={nats_url}",
            f"--stream={stream}",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout)


async def check_acked_replies_are_in_stream(
    nc: NatsClient, stream: str, replies: list[dict[str, object]]
) -> list[StoredMessage]:
    """G2: every OK reply names an event that is in the stream where it said."""
    stored = {m.stream_sequence: m for m in await stream_messages(nc, stream)}
    acked = [r for r in replies if "sequence" in r]
    for reply in acked:
        message = stored.get(int(str(reply["stream_sequence"])))
        assert message is not None, f"acked event missing from stream: {reply}"
        assert message.headers["Entity-Id"] == reply["entity"], reply
        assert message.headers["Entity-Sequence"] == str(reply["sequence"]), reply
        assert message.headers["Nats-Msg-Id"].endswith(f":{reply['key']}"), reply
    return list(stored.values())


PRODUCERS = 6


EVENTS_EACH = 500


ENTITIES = 24


def sidecar_options(
    nats_server: NatsServer,
    redis_server: RedisServer,
    names: dict[str, str],
    lock_backend: str = "redis",
) -> dict[str, str]:
    """Flags shared by the sidecars of one test."""
    options = {
        "nats_url": nats_server.url,
        "stream": names["stream"],
        "subject_prefix": names["subject_prefix"],
        "lock_ttl": "2",
        "lock_wait": "5",
        "lock_backend": lock_backend,
    }
    if lock_backend == "redis":
        options["redis_url"] = redis_server.url
    else:
        options["lock_bucket"] = names["lock_bucket"]
    return options


def start_producers(
    producers: Producers, sidecars: list[SidecarProcess], api: str = "unary"
) -> None:
    """Two producers per sidecar, each with 4 concurrent tasks (or one stream)."""
    for n in range(PRODUCERS):
        producers.start(
            "sidecar",
            f"producer-{n}",
            target=sidecars[n % len(sidecars)].target,
            entities=ENTITIES,
            events=EVENTS_EACH,
            tasks=4,
            api=api,
        )


async def check_exactly_once_in_order(
    nc: NatsClient, nats_url: str, stream: str, producers: Producers
) -> None:
    """Every event acked once, in the stream once, and every entity in order (G1, G2, G3)."""
    replies = producers.replies()
    total = PRODUCERS * EVENTS_EACH
    assert len(replies) == total
    failed = [r for r in replies if "error" in r]
    assert not failed, failed[:5]
    stored = await check_acked_replies_are_in_stream(nc, stream, replies)
    keys = [m.headers["Nats-Msg-Id"].rsplit(":", 1)[1] for m in stored]
    assert len(keys) == total, f"{len(keys)} events in the stream for {total} published"
    assert len(set(keys)) == total, "an event was published twice"
    status, report = run_verify(nats_url, stream)
    assert report["patient"]["events"] == total
    assert report["patient"]["entities"] == ENTITIES
    violations = {k: report["patient"][k] for k in ("gaps", "duplicates", "inversions")}
    assert violations == {"gaps": 0, "duplicates": 0, "inversions": 0}
    assert status == 0
