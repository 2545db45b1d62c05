"""The suite's target lines: each target's ratio, from rows of one run, and its baseline.

A line names the measured row and the row it divides by (setting and mode, as in the
table), both values and the ratio; a row the run did not measure (a group left out with
``--suite-only``) makes the line say so.
"""

from __future__ import annotations

from dataclasses import dataclass

from order_sidecar_tools.bench.baselines import PULL_BATCH
from order_sidecar_tools.bench.cluster import cluster_setting
from order_sidecar_tools.bench.consumers import consumer_setting, ordered_mode
from order_sidecar_tools.bench.grid import grid_setting
from order_sidecar_tools.bench.latency import ECHO_MODE, RAW_MODE, SIDECAR_MODE, latency_setting
from order_sidecar_tools.bench.rows import SuiteRow
from order_sidecar_tools.bench.rss import RssReport
from order_sidecar_tools.bench.runner import BenchConfig, BenchRow

RAW_PIPELINED = "raw publish_async, 64 in flight"
ECHO = "grpc.aio echo, 64 in flight"
UNARY = "Publish (unary)"
RAW_PULL = f"raw pull fetch+ack, {PULL_BATCH}/fetch"


@dataclass(frozen=True)
class TargetLine:
    """One target's figure: *ratio* = measured / *baseline* (None: not measured)."""

    target: str
    measured: str
    baseline: str
    ratio: float | None
    text: str
    added_p99_ms: float | None = None
    """T7 only: the sidecar's p99 minus (raw p99 + echo p99)."""


Key = tuple[str, str]
"""A row's (setting, mode)."""


class _Found:
    def __init__(self, rows: list[SuiteRow]) -> None:
        self.rows = {(r.setting, r.row.mode): r.row for r in rows}

    def get(self, key: Key) -> BenchRow | None:
        return self.rows.get(key)

    def rate_line(self, target: str, key: Key, base: Key, note: str = "") -> TargetLine:
        """*key*'s events/s over *base*'s."""
        measured = _name(key)
        baseline = base[1] if base[0] == key[0] else _name(base)
        row, base_row = self.get(key), self.get(base)
        if row is None or base_row is None:
            text = f"{target}  {measured} / {baseline}: not measured in this run"
            return TargetLine(target, measured, baseline, None, text)
        ratio = round(row.events_per_s / base_row.events_per_s, 3)
        text = (
            f"{target}  {measured} {row.events_per_s:.0f}/s{note} / baseline {baseline} "
            f"{base_row.events_per_s:.0f}/s = {ratio:.3f}"
        )
        return TargetLine(target, measured, baseline, ratio, text)


def _name(key: Key) -> str:
    return f"{key[1]} [{key[0]}]"


def target_lines(
    config: BenchConfig, rows: list[SuiteRow], memory: RssReport | None
) -> list[TargetLine]:
    """T1-T7 and the cluster's line, in order."""
    found = _Found(rows)
    return [
        *_publish_targets(config, found),
        _hot_entity(found),
        _memory(memory),
        *_consumers(config, found),
        _latency(config, found),
        *_cluster(config, found),
    ]


def _publish_targets(config: BenchConfig, found: _Found) -> list[TargetLine]:
    """T1 and T3: ordered modes over raw pipelined publish; T2: unary over the echo."""
    batch = f"PublishBatch ({config.batch_size}/call)"

    def ordered(target: str, payload: int) -> list[TargetLine]:
        base = (f"{payload} B", RAW_PIPELINED)
        keys = [(grid_setting(payload, 1000, 1), mode) for mode in (batch, "PublishStream")]
        return [found.rate_line(target, key, base) for key in keys]

    unary = [
        found.rate_line("T2", (grid_setting(256, entities, 1), UNARY), ("256 B", ECHO))
        for entities in (1000, 100)
    ]
    return [*ordered("T1", 256), *unary, *ordered("T3", 10240)]


def _hot_entity(found: _Found) -> TargetLine:
    key = (grid_setting(256, 1, 3), UNARY)
    row = found.get(key)
    note = ""
    if row is not None:
        shares = "/".join(f"{s:.2f}" for s in row.shares) or "not counted"
        note = f", p99 {row.call_p99_ms:.1f} ms, sidecar shares {shares}"
    return found.rate_line("T4", key, (grid_setting(256, 1000, 1), UNARY), note)


def _memory(memory: RssReport | None) -> TargetLine:
    measured, baseline = "RSS after new entities (loaded)", "RSS at start"
    if memory is None:
        text = f"T5  {measured} / {baseline}: not measured in this run"
        return TargetLine("T5", measured, baseline, None, text)
    ratio = round(memory.rss_loaded_mb / memory.rss_start_mb, 3)
    text = (
        f"T5  RSS after {memory.entities} new entities {memory.rss_loaded_mb:.1f} MB "
        f"(idle {memory.rss_idle_mb:.1f} MB, {memory.locks_held_idle} locks held) / "
        f"baseline RSS at start {memory.rss_start_mb:.1f} MB = {ratio:.3f}"
    )
    return TargetLine("T5", measured, baseline, ratio, text)


def _consumers(config: BenchConfig, found: _Found) -> list[TargetLine]:
    setting = consumer_setting(config)
    one, three = (setting, ordered_mode(1)), (setting, ordered_mode(3))
    return [
        found.rate_line("T6", one, (setting, RAW_PULL)),
        found.rate_line("T6", three, one),
    ]


def _latency(config: BenchConfig, found: _Found) -> TargetLine:
    setting = latency_setting(config.suite_latency_rate)
    sidecar = found.get((setting, SIDECAR_MODE))
    raw, echo = found.get((setting, RAW_MODE)), found.get((setting, ECHO_MODE))
    measured = f"p99 of {SIDECAR_MODE} [{setting}]"
    baseline = f"p99 of {RAW_MODE} + p99 of {ECHO_MODE} [{setting}]"
    if sidecar is None or raw is None or echo is None:
        text = f"T7  {measured} / {baseline}: not measured in this run"
        return TargetLine("T7", measured, baseline, None, text)
    floor = raw.call_p99_ms + echo.call_p99_ms
    ratio = round(sidecar.call_p99_ms / floor, 3) if floor else None
    added = round(sidecar.call_p99_ms - floor, 2)
    text = (
        f"T7  {measured} {sidecar.call_p99_ms:.2f} ms (p50 {sidecar.call_p50_ms:.2f}) / "
        f"baseline {baseline} {raw.call_p99_ms:.2f} + {echo.call_p99_ms:.2f} ms = "
        f"{ratio if ratio is not None else '-'}; added p99 {added:.2f} ms"
    )
    return TargetLine("T7", measured, baseline, ratio, text, added)


def _cluster(config: BenchConfig, found: _Found) -> list[TargetLine]:
    batch = f"PublishBatch ({config.batch_size}/call)"
    key = (cluster_setting(), f"{batch}, 1 sc")
    return [
        found.rate_line("R3", key, (cluster_setting(), RAW_PIPELINED)),
        found.rate_line("R3", key, (grid_setting(256, 1000, 1), batch)),
    ]
