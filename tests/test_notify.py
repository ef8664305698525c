"""daemon/notify.py against a real AF_UNIX datagram socket, as systemd listens on one."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.notify import Notifier


class Listener:
    """What systemd does with $NOTIFY_SOCKET: a bound datagram socket, one message per datagram."""

    def __init__(self, address: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(2.0)

    def recv(self) -> str:
        return self.sock.recv(4096).decode()

    def drain(self, wait_s: float = 0.05) -> list[str]:
        self.sock.settimeout(wait_s)
        out = []
        try:
            while True:
                out.append(self.sock.recv(4096).decode())
        except TimeoutError:
            return out
        finally:
            self.sock.settimeout(2.0)


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[str, Listener]]:
    path = str(tmp_path / "notify.sock")
    sock = Listener(path)
    yield path, sock
    sock.sock.close()


def test_ready_watchdog_stopping_through_a_datagram_socket(listener: tuple[str, Listener]) -> None:
    path, sock = listener
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"})  # WatchdogSec=1
    assert notifier.enabled and notifier.ping_interval_s == pytest.approx(0.5)

    assert not notifier.watchdog()  # systemd arms the watchdog at READY=1: no pings before it
    notifier.ready("patching tiny")
    assert sock.recv() == "READY=1\nSTATUS=patching tiny"
    assert not notifier.watchdog()  # rate limit: at most one ping per WatchdogSec/2
    time.sleep(0.55)
    assert notifier.watchdog()
    assert sock.recv() == "WATCHDOG=1"

    notifier.status("busy")
    assert sock.recv() == "STATUS=busy"
    notifier.stopping()
    notifier.stopping()  # once only
    assert sock.drain() == ["STOPPING=1"]


def test_extend_timeout_is_repeated_while_a_phase_runs(listener: tuple[str, Listener]) -> None:
    path, sock = listener
    notifier = Notifier({"NOTIFY_SOCKET": path})
    with notifier.extending(step_s=0.1):
        time.sleep(0.3)
    messages = sock.drain()
    assert messages.count("EXTEND_TIMEOUT_USEC=100000") >= 2  # at 0, 0.05, 0.1, ... s
    assert "WATCHDOG=1" not in messages  # not READY yet: nothing to ping
    time.sleep(0.1)
    assert sock.drain() == []  # the helper thread ended with the phase


def test_abstract_socket_address(tmp_path: Path) -> None:
    name = f"patchd-test-{uuid.uuid4().hex}"
    sock = Listener("\0" + name)
    try:
        Notifier({"NOTIFY_SOCKET": "@" + name}).ready()
        assert sock.recv() == "READY=1"
    finally:
        sock.sock.close()


def test_outside_systemd_everything_is_a_no_op(tmp_path: Path) -> None:
    notifier = Notifier({})
    assert not notifier.enabled and not notifier.send("READY=1")
    notifier.ready()
    assert not notifier.watchdog(force=True)
    # a socket that is gone (systemd restarted) is logged, never raised
    assert not Notifier({"NOTIFY_SOCKET": str(tmp_path / "missing.sock")}).send("READY=1")


def test_watchdog_of_another_process_is_ignored(listener: tuple[str, Listener]) -> None:
    path, _ = listener
    other = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid() + 1)})
    assert other.ping_interval_s is None
    mine = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())})
    assert mine.ping_interval_s == pytest.approx(0.5)
