"""One error edge: every error class has a kind, every kind one status code."""

from __future__ import annotations

import inspect

import grpc
import pytest
from order_sidecar.core import errors
from order_sidecar.core.errors import (
    EarlierEventFailed,
    ErrorKind,
    InvalidEvent,
    SidecarError,
    Unavailable,
)
from order_sidecar.rpc.status import STATUS_OF_KIND, grpc_status


def error_classes() -> list[type[SidecarError]]:
    """Every SidecarError class the core defines."""
    return [
        value
        for _, value in inspect.getmembers(errors, inspect.isclass)
        if issubclass(value, SidecarError)
    ]


def an_instance(cls: type[SidecarError]) -> SidecarError:
    if cls is EarlierEventFailed:
        return cls("skipped", Unavailable("down"))
    return cls("message")


def test_every_kind_has_one_status_code() -> None:
    assert set(STATUS_OF_KIND) == set(ErrorKind)


@pytest.mark.parametrize("cls", error_classes(), ids=lambda cls: cls.__name__)
def test_every_error_class_maps_to_a_status(cls: type[SidecarError]) -> None:
    error = an_instance(cls)
    code, message = grpc_status(error)
    assert code == STATUS_OF_KIND[error.kind]
    assert message == str(error)


def test_the_walk_finds_the_whole_hierarchy() -> None:
    names = {cls.__name__ for cls in error_classes()}
    assert {"FencingConflict", "LockBackendUnavailable", "ShuttingDown", "LeaseLost"} <= names
    assert len(names) >= 15


def test_an_unmapped_kind_would_be_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The table check fails when a kind loses its code (the guard can fail)."""
    monkeypatch.delitem(STATUS_OF_KIND, ErrorKind.LIMIT)
    assert set(STATUS_OF_KIND) != set(ErrorKind)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidEvent("bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.Contention("busy"), grpc.StatusCode.ABORTED),
        (errors.LimitExceeded("full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.LeaseNotFound("gone"), grpc.StatusCode.NOT_FOUND),
        (Unavailable("down"), grpc.StatusCode.UNAVAILABLE),
        (RuntimeError("boom"), grpc.StatusCode.INTERNAL),
    ],
)
def test_codes_callers_rely_on(error: BaseException, code: grpc.StatusCode) -> None:
    assert grpc_status(error)[0] == code


def test_an_earlier_failure_decides_whether_later_events_may_be_retried() -> None:
    retry = EarlierEventFailed("skipped", Unavailable("down"))
    final = EarlierEventFailed("skipped", InvalidEvent("bad"))
    assert (retry.kind, retry.retryable) == (ErrorKind.CONFLICT, True)
    assert (final.kind, final.retryable) == (ErrorKind.PRECONDITION, False)
    assert grpc_status(final)[0] == grpc.StatusCode.FAILED_PRECONDITION


def test_an_unexplained_error_says_internal_and_what_it_was() -> None:
    code, message = grpc_status(KeyError("x"))
    assert code == grpc.StatusCode.INTERNAL
    assert message == "internal error: KeyError: 'x'"
