"""Logging: structlog, one JSON object per line on stdout, for patchd and its libraries alike.

(Named logs.py, not logging.py: that would shadow the standard library.)

patchd's own code logs through `get_logger(__name__)`; kafka-python, SQLAlchemy, APScheduler and
anything else using stdlib `logging` reach the same handler through the root logger, and
`structlog.stdlib.ProcessorFormatter` renders both with one processor chain, so every line has
the same keys: timestamp (ISO-8601 UTC), level, logger, event, and whatever context is bound.

Context: `log_context(event_id=..., fingerprint=..., version=...)` binds values for everything
logged inside it, from structlog and stdlib loggers. Context variables do not cross threads:
the consumer, the worker and scheduler jobs each bind their own.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

import structlog
from structlog.types import Processor

# Library loggers that are chatty at INFO; they never log below these levels (DEBUG included),
# because patchd's own debug lines are what a DEBUG run is for.
LIBRARY_LEVELS: dict[str, int] = {
    "kafka": logging.WARNING,  # kafka-python logs every connection, rebalance step and metadata refresh
    "apscheduler": logging.WARNING,  # "Running job ..." / "executed successfully" on every tick
    "sqlalchemy.engine": logging.WARNING,  # INFO is the statement echo
    "urllib3": logging.WARNING,
    "filelock": logging.WARNING,
}

# the context keys the daemon binds; one spelling everywhere makes logs joinable
EVENT_ID, FINGERPRINT, VERSION, MISTAKE_ID, PATCH_ID = (
    "event_id",
    "fingerprint",
    "version",
    "mistake_id",
    "patch_id",
)


def _shared_processors() -> list[Processor]:
    """Run for every record, structlog's and stdlib's, before rendering."""
    return [
        structlog.contextvars.merge_contextvars,  # first: bound context under the call's own keys
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]


def configure_logging(
    level: str = "INFO", json: bool = True, stream: TextIO | None = None, capture_warnings: bool = True
) -> None:
    """Route structlog and stdlib logging through one renderer on `stream` (default: stdout).

    `json=False` renders readable console lines instead (for a terminal). Idempotent: a second
    call replaces the handler the first one installed and leaves other handlers alone.
    """
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"log.level must be DEBUG, INFO, WARNING or ERROR, got {level!r}")
    shared = _shared_processors()
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,  # cheap early exit for disabled levels
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    renderer: Processor = (
        structlog.processors.JSONRenderer(default=str)  # default=str: a Path or datetime never breaks a line
        if json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    final: list[Processor] = [structlog.stdlib.ProcessorFormatter.remove_processors_meta]
    if json:
        final.append(structlog.processors.format_exc_info)  # the traceback as one string field
    final.append(renderer)
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],  # stdlib records: same keys + extra=
        processors=final,
    )
    handler = logging.StreamHandler(stream if stream is not None else sys.stdout)
    handler.setFormatter(formatter)
    handler._patchd = True  # type: ignore[attr-defined]  # marks the handler this module owns

    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_patchd", False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    for name, floor in LIBRARY_LEVELS.items():
        logging.getLogger(name).setLevel(max(numeric, floor))
    logging.captureWarnings(capture_warnings)  # warnings.warn (torch, transformers) as log lines too


def get_logger(name: str | None = None, **initial: Any) -> structlog.stdlib.BoundLogger:
    """A structlog logger named like a stdlib one (`get_logger(__name__)`), with optional bound values."""
    logger = structlog.stdlib.get_logger(name)
    return logger.bind(**initial) if initial else logger


@contextmanager
def log_context(**values: Any) -> Iterator[None]:
    """Bind values (None ones are skipped) for every line logged in this block on this thread.

    with log_context(event_id=report.event_id, fingerprint=report.fingerprint): ...
    """
    present = {k: v for k, v in values.items() if v is not None}
    with structlog.contextvars.bound_contextvars(**present):
        yield


def bind(**values: Any) -> None:
    """Bind values until `unbind`/`clear_context` (for a loop that owns its thread)."""
    structlog.contextvars.bind_contextvars(**{k: v for k, v in values.items() if v is not None})


def unbind(*keys: str) -> None:
    structlog.contextvars.unbind_contextvars(*keys)


def clear_context() -> None:
    structlog.contextvars.clear_contextvars()
