"""Long runs (`patchd evaluate`, `patchd bench scale`) end with a partial report on a signal."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Ctrl-C, `kill -INT` and `kill` (SIGTERM) all end the stream with the partial report.

    A shell starts a background job (`nohup patchd evaluate ... &`) with SIGINT ignored, so a long
    run could otherwise only be killed, losing hours of edits; SIGTERM is what `kill` and systemd send.
    """

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
