"""Logging setup: one line per event, as text for people or JSON for log pipelines.

Log calls name their ids in the message (``request r-1 started``) and also pass them as
``extra`` fields (``request_id``, ``client_id``, ...), which the JSON format emits as keys.
Nothing logs message content: only ids, sizes, codes and timings.

@.architecture
role: logging setup
jobs: [logging]
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

# Attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                event[key] = value
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(event, default=str).decode()


class WorkerTag(logging.Filter):
    """Names the worker on every line (``worker``), when several share one log."""

    def __init__(self, worker: str) -> None:
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.worker
        return True


def configure_logging(level: str, fmt: str = "text", worker: str | None = None) -> None:
    """Log to stderr at ``level``; ``worker``: this process is that worker of a supervisor."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        formatter: logging.Formatter = JSONFormatter()
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    else:
        tag = "[%(worker)s] " if worker is not None else ""
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)-7s {tag}%(name)s: %(message)s")
        )
    if worker is not None:
        handler.addFilter(WorkerTag(worker))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
