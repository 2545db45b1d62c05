"""Logging set-up: ``--log-format text|json`` and ``--log-level``.

Failure lines carry ``entity_type``, ``reason`` and ``duration_ms`` as fields (JSON keys,
or ``key=value`` in text). They never carry a payload.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any

FIELDS = ("rpc", "code", "entity_type", "reason", "duration_ms", "backend")

_URL_USERINFO = re.compile(r"//[^/@,]*@")


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update({key: getattr(record, key) for key in FIELDS if hasattr(record, key)})
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """The usual line, with any structured fields appended as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={getattr(record, k)}" for k in FIELDS if hasattr(record, k))
        text = super().format(record)
        return f"{text} [{fields}]" if fields else text


def setup_logging(level: str, log_format: str) -> None:
    """Configure the root logger once, at start-up."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def redact_url(url: str) -> str:
    """*url* without any ``user:password@`` part, for logs and error messages."""
    return _URL_USERINFO.sub("//***@", url)
