"""systemd's notify protocol (sd_notify) in a few lines: datagrams to $NOTIFY_SOCKET, no dependency.

    READY=1                 the model, the memory set and the consumer are up (Type=notify)
    STATUS=...              one line `systemctl status` shows
    WATCHDOG=1              the main loop is alive; systemd restarts the service when pings stop
                            for WatchdogSec (it passes that as $WATCHDOG_USEC)
    EXTEND_TIMEOUT_USEC=N   the current start (or stop) needs N more microseconds
    STOPPING=1              shutdown has begun

Outside systemd (no $NOTIFY_SOCKET) every call is a no-op, so the daemon runs the same way from a
shell, a test or a unit. A leading '@' in the address names an abstract socket (Linux). systemd arms
the watchdog when READY=1 arrives, so pings before that are not needed (and are not sent).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from daemon.logs import get_logger

log = get_logger(__name__)

# EXTEND_TIMEOUT_USEC step during start-up: each message buys this much; it is resent every half
EXTEND_STEP_S = 60.0
# a start-up that still is not done after this long is hung: stop extending and let systemd act
EXTEND_MAX_S = 2 * 3600.0


class Notifier:
    """Sends sd_notify messages; thread-safe (one datagram per call, the socket is per call)."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET") or None
        if address and address.startswith("@"):
            address = "\0" + address[1:]  # abstract namespace
        self.address = address
        # WATCHDOG_PID, when set, names the process the watchdog belongs to (not a child of it)
        pid = env.get("WATCHDOG_PID")
        usec = env.get("WATCHDOG_USEC")
        mine = pid is None or pid == str(os.getpid())
        self.watchdog_s = int(usec) / 1e6 if usec and usec.isdigit() and int(usec) > 0 and mine else None
        self.ready_sent = False
        self.stopping_sent = False
        self._last_ping = 0.0

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def ping_interval_s(self) -> float | None:
        """At most one WATCHDOG=1 per half of WatchdogSec (systemd's own advice); None: no watchdog."""
        return None if self.watchdog_s is None else self.watchdog_s / 2

    def send(self, *fields: str) -> bool:
        """One datagram `FIELD=value\\n...`; False when not under systemd or the send failed."""
        if self.address is None:
            return False
        message = "\n".join(fields).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self.address)
                sock.sendall(message)
        except OSError as exc:  # systemd gone or the socket not ours: never fatal to the daemon
            log.warning("sd_notify failed", error=repr(exc), message=message.decode()[:100])
            return False
        return True

    def ready(self, status: str | None = None) -> None:
        self.ready_sent = True
        self._last_ping = time.monotonic()
        self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def stopping(self, status: str | None = None) -> None:
        if not self.stopping_sent:
            self.stopping_sent = True
            self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def extend_timeout(self, seconds: float) -> None:
        self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")

    def watchdog(self, force: bool = False) -> bool:
        """Ping from the main loop: sends only when half of WatchdogSec has passed since the last one."""
        interval = self.ping_interval_s
        if interval is None or not self.ready_sent:
            return False
        now = time.monotonic()
        if not force and now - self._last_ping < interval:
            return False
        self._last_ping = now
        return self.send("WATCHDOG=1")

    @contextmanager
    def extending(self, step_s: float = EXTEND_STEP_S, max_s: float = EXTEND_MAX_S) -> Iterator[None]:
        """Keep a long blocking phase (model load, replay) within systemd's timeouts.

        A helper thread sends EXTEND_TIMEOUT_USEC=step every step/2 seconds (and, if READY=1 was
        already sent, as by a standby that took over, WATCHDOG=1 too), for at most `max_s`.
        """
        if not self.enabled:
            yield
            return
        done = threading.Event()

        def keep() -> None:
            deadline = time.monotonic() + max_s
            while time.monotonic() < deadline:
                self.extend_timeout(step_s)
                self.watchdog(force=True)
                if done.wait(step_s / 2):
                    return
            log.error("start-up phase still running; no more timeout extensions", seconds=max_s)

        thread = threading.Thread(target=keep, name="patchd-notify", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join(timeout=5)
