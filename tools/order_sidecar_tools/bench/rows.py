"""What the suite's row groups share: the row of the table, the run's context, progress."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from order_sidecar_tools.bench.runner import BenchConfig, BenchRow


@dataclass
class SuiteRow:
    """One measured mode in one setting, with its ratio to the baseline of its group."""

    setting: str
    row: BenchRow
    group: str = "grid"
    ratio: float | None = None
    baseline: str = ""
    """Short name of the row the ratio divides by (empty: no ratio)."""

    def divide_by(self, base: BenchRow, name: str) -> None:
        """Set the ratio: this row's events/s over *base*'s, which *name* names."""
        self.ratio = round(self.row.events_per_s / base.events_per_s, 3)
        self.baseline = name


@dataclass(frozen=True)
class SuiteContext:
    """What every row group runs against: the options, the embedded NATS server, the echo
    server, and a scratch folder."""

    config: BenchConfig
    url: str
    echo_target: str
    scratch: Path


def progress(text: str) -> None:
    """One line of progress on stderr."""
    print(f"bench: {text}", file=sys.stderr, flush=True)
