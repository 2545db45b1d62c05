"""The order checker catches each kind of violation (and reports none when there is none)."""

from __future__ import annotations

import pytest
from order_sidecar.jetstream.verify import OrderChecker, format_table


def check(*sequences: int) -> dict[str, int]:
    checker = OrderChecker()
    for sequence in sequences:
        checker.observe({"Entity-Type": "t", "Entity-Id": "e", "Entity-Sequence": str(sequence)})
    report = checker.report()["t"]
    return {"gaps": report.gaps, "duplicates": report.duplicates, "inversions": report.inversions}


@pytest.mark.parametrize(
    "sequences, expected",
    [
        ((1, 2, 3), {"gaps": 0, "duplicates": 0, "inversions": 0}),
        ((1, 3), {"gaps": 1, "duplicates": 0, "inversions": 0}),
        ((2, 3), {"gaps": 1, "duplicates": 0, "inversions": 0}),
        ((1, 2, 2, 3), {"gaps": 0, "duplicates": 1, "inversions": 0}),
        ((1, 3, 2), {"gaps": 0, "duplicates": 0, "inversions": 1}),
        ((2, 1, 1), {"gaps": 0, "duplicates": 1, "inversions": 1}),
    ],
)
def test_checker_counts(sequences: tuple[int, ...], expected: dict[str, int]) -> None:
    assert check(*sequences) == expected


def test_malformed_and_entities_counted_per_type() -> None:
    checker = OrderChecker()
    checker.observe({"Entity-Type": "a", "Entity-Id": "1", "Entity-Sequence": "1"})
    checker.observe({"Entity-Type": "a", "Entity-Id": "2", "Entity-Sequence": "1"})
    checker.observe({"Entity-Type": "a", "Entity-Id": "3"})
    checker.observe(None)
    reports = checker.report()
    assert (reports["a"].events, reports["a"].entities, reports["a"].malformed) == (3, 2, 1)
    assert reports["?"].malformed == 1
    table = format_table(reports)
    assert table.splitlines()[0].split() == [
        "entity_type",
        "events",
        "entities",
        "gaps",
        "duplicates",
        "inversions",
        "malformed",
    ]
    assert table.splitlines()[-1].split() == ["TOTAL", "4", "2", "0", "0", "0", "2"]
