"""daemon/logs.py: one JSON line per record, from structlog and stdlib loggers, with bound context."""

from __future__ import annotations

import io
import json
import logging
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from daemon.logs import bind, clear_context, configure_logging, get_logger, log_context


@pytest.fixture
def out() -> Iterator[io.StringIO]:
    """Configure into a buffer; afterwards take our handler off and restore the library defaults."""
    stream = io.StringIO()
    configure_logging("INFO", json=True, stream=stream, capture_warnings=False)
    yield stream
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_patchd", False)]:
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)
    clear_context()
    structlog.reset_defaults()


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_stdlib_library_logger_comes_out_as_json(out: io.StringIO) -> None:
    logging.getLogger("kafka.conn").warning("connection to %s failed", "127.0.0.1:9092", extra={"attempt": 3})
    (line,) = lines(out)
    assert line["event"] == "connection to 127.0.0.1:9092 failed"
    assert line["level"] == "warning" and line["logger"] == "kafka.conn" and line["attempt"] == 3
    assert line["timestamp"].endswith("Z")


def test_library_info_is_quiet_but_our_info_is_not(out: io.StringIO) -> None:
    logging.getLogger("kafka.coordinator").info("heartbeat")  # chatty library: below its floor
    logging.getLogger("apscheduler.executors.default").info("Running job")
    logging.getLogger("daemon.worker").info("patched")
    logging.getLogger("daemon.worker").debug("not at INFO")
    assert [line["event"] for line in lines(out)] == ["patched"]


def test_bound_context_reaches_structlog_and_stdlib_lines(out: io.StringIO) -> None:
    log = get_logger("daemon.consumer", partition=2)
    with log_context(event_id="e-1", fingerprint="ab12", version=None):
        log.info("report stored", offset=41)
        logging.getLogger("sqlalchemy.pool").warning("pool overflow")
        with log_context(version=7):
            log.info("published")
    log.info("outside")
    first, second, third, fourth = lines(out)
    assert first == {
        **first,
        "event": "report stored",
        "event_id": "e-1",
        "fingerprint": "ab12",
        "partition": 2,
        "offset": 41,
        "logger": "daemon.consumer",
        "level": "info",
    }
    assert "version" not in first  # None values are not bound
    assert second["event_id"] == "e-1" and second["logger"] == "sqlalchemy.pool"
    assert third["version"] == 7 and third["event_id"] == "e-1"
    assert "event_id" not in fourth and fourth["partition"] == 2


def test_context_does_not_cross_threads(out: io.StringIO) -> None:
    bind(event_id="main-thread")
    thread = threading.Thread(target=lambda: get_logger("daemon.worker").info("in worker"))
    thread.start()
    thread.join()
    get_logger("daemon.consumer").info("in consumer")
    worker, consumer = lines(out)
    assert "event_id" not in worker and consumer["event_id"] == "main-thread"


def test_exceptions_and_odd_values_render_as_json(out: io.StringIO) -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        get_logger("daemon.worker").exception("patch failed", path=Path("/tmp/x"))
    (line,) = lines(out)
    assert line["level"] == "error" and line["path"] == "/tmp/x"
    assert "RuntimeError: boom" in line["exception"] and "Traceback" in line["exception"]


def test_reconfiguring_replaces_only_our_handler(out: io.StringIO) -> None:
    root = logging.getLogger()
    others = [h for h in root.handlers if not getattr(h, "_patchd", False)]
    second = io.StringIO()
    configure_logging("DEBUG", json=True, stream=second, capture_warnings=False)
    logging.getLogger("daemon.worker").debug("now visible")
    assert out.getvalue() == "" and lines(second)[0]["event"] == "now visible"
    assert [h for h in root.handlers if not getattr(h, "_patchd", False)] == others
    assert sum(getattr(h, "_patchd", False) for h in root.handlers) == 1
    # DEBUG does not open the libraries' floodgates
    logging.getLogger("kafka.conn").debug("bytes on the wire")
    assert len(lines(second)) == 1


def test_console_mode_and_warnings_capture(out: io.StringIO) -> None:
    console = io.StringIO()
    configure_logging("INFO", json=False, stream=console, capture_warnings=True)
    try:
        get_logger("daemon.cli").info("hello", model="fever-minilm")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("old API", DeprecationWarning, stacklevel=1)
    finally:
        logging.captureWarnings(False)
    text = console.getvalue()
    assert "hello" in text and "model=fever-minilm" in text and not text.lstrip().startswith("{")
    assert "old API" in text


def test_bad_level_names_the_setting() -> None:
    with pytest.raises(ValueError, match="log.level"):
        configure_logging("LOUD", stream=io.StringIO())
