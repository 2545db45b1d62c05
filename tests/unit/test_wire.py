"""The stream contract: tokens are safe and unique, partitions are stable."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from order_sidecar_client import contract

SAFE_TOKEN = re.compile(r"[A-Za-z0-9_-]+")


@pytest.mark.parametrize(
    "entity_id",
    ["42", "a.b", "*", ">", "a b", "ünïcödé", "日本", "_x", "-x", "x" * 64, "x" * 65, "a\tb", "."],
)
def test_token_is_safe_and_round_trips(entity_id: str) -> None:
    token = contract.entity_token(entity_id)
    assert SAFE_TOKEN.fullmatch(token), token
    assert contract.entity_id_from_token(token) == entity_id


def test_plain_ids_are_readable() -> None:
    assert contract.entity_token("patient-42_a") == "patient-42_a"
    assert contract.entity_token("_hidden") != "_hidden"


@given(st.text(min_size=1, max_size=80), st.text(min_size=1, max_size=80))
def test_different_ids_never_share_a_token(first: str, second: str) -> None:
    if first != second:
        assert contract.entity_token(first) != contract.entity_token(second)
    assert SAFE_TOKEN.fullmatch(contract.entity_token(first))


def test_partition_is_documented_fnv1a() -> None:
    # Published FNV-1a 32 test vectors, also listed in docs/wire-format.md.
    assert contract.partition_of("", 2**32) == 0x811C9DC5
    assert contract.partition_of("a", 2**32) == 0xE40C292C
    assert contract.partition_of("foobar", 2**32) == 0xBF9CF968
    assert contract.partition_of("foobar", 16) == 0xBF9CF968 % 16 == 8
    assert contract.subject_for("events", "patient", "foobar", 16) == "events.patient.8.foobar"


def test_partitions_spread_ids() -> None:
    counts = [0] * 8
    for number in range(8000):
        counts[contract.partition_of(f"id-{number}", 8)] += 1
    assert min(counts) > 800


@pytest.mark.parametrize("name", ["Nats-Msg-Id", "nats-anything", "Entity-Sequence", "ENTITY-x"])
def test_reserved_headers(name: str) -> None:
    assert contract.is_reserved_header(name)
    assert not contract.is_reserved_header("X-Trace-Id")
