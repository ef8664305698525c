"""The one local S3-compatible server launcher, shared by the tests and the benchmarks.

`deploy/s3/server.sh` is the server (s3proxy, a real S3 REST API over a local directory, on
127.0.0.1, from Maven Central jars); this module starts and stops it on a free port with a
private state directory, and hands out its endpoint and credentials.

    server = S3ServerScript.on_free_port(state_dir); server.start()   # the test fixture
    with s3_server() as server: server.options(), server.env()         # benchmarks: stopped after
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from daemon.tools.broker import free_ports

SERVER_SH = Path(__file__).resolve().parents[2] / "deploy" / "s3" / "server.sh"
# a cold JVM answers in ~2 s on an idle 2-core machine; a first run also fetches the jars (~20 s)
START_TIMEOUT_S = 240
STOP_TIMEOUT_S = 60
BUCKET = "patchd"  # created by server.sh at start


class S3ServerError(RuntimeError):
    """server.sh failed; the message carries its output (and so the server log's tail)."""


@dataclass
class S3ServerScript:
    """One server instance as deploy/s3/server.sh sees it: its port, state directory and credentials."""

    port: int
    state_dir: Path
    credentials: dict[str, str] = field(default_factory=dict)  # AWS_* lines printed by `start`

    @classmethod
    def on_free_port(cls, state_dir: Path) -> S3ServerScript:
        return cls(port=free_ports(1)[0], state_dir=state_dir)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def run(self, command: str, timeout: float = START_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "S3_PORT": str(self.port), "S3_STATE_DIR": str(self.state_dir)}
        return subprocess.run(
            ["bash", str(SERVER_SH), command],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def start(self) -> str:
        """Start the server and return its endpoint once a signed request is answered."""
        result = self.run("start")
        if result.returncode != 0:
            raise S3ServerError(
                f"deploy/s3/server.sh start failed (exit {result.returncode}) on port {self.port}, "
                f"state {self.state_dir}:\n{result.stdout}{result.stderr}"
            )
        lines = result.stdout.strip().splitlines()
        self.credentials = dict(line.split("=", 1) for line in lines[1:] if "=" in line)
        return lines[0]

    def stop(self) -> None:
        result = self.run("stop", STOP_TIMEOUT_S)
        if result.returncode != 0:
            raise S3ServerError(f"deploy/s3/server.sh stop failed:\n{result.stdout}{result.stderr}")

    def env(self) -> dict[str, str]:
        """The AWS_* variables a client needs for this server (endpoint, keys, region)."""
        return dict(self.credentials)

    def settings_env(self) -> dict[str, str]:
        """The same as PATCHD_STORAGE_* variables (what an operator's environment file holds)."""
        return {
            "PATCHD_STORAGE_ENDPOINT_URL": self.endpoint,
            "PATCHD_STORAGE_ACCESS_KEY_ID": self.credentials["AWS_ACCESS_KEY_ID"],
            "PATCHD_STORAGE_SECRET_ACCESS_KEY": self.credentials["AWS_SECRET_ACCESS_KEY"],
            "PATCHD_STORAGE_REGION": self.credentials.get("AWS_REGION", "us-east-1"),
        }


@contextmanager
def s3_server(state_dir: Path | None = None) -> Iterator[S3ServerScript]:
    """A private server (server.sh on a free port), stopped afterwards; its objects live in
    `state_dir` (default: a temporary directory, removed after)."""
    scratch = tempfile.TemporaryDirectory(prefix="patchd-s3-") if state_dir is None else None
    state = Path(scratch.name) if scratch is not None else Path(state_dir or ".")
    try:
        server = S3ServerScript.on_free_port(state)
        print(f"starting a private S3 server (s3proxy) on {server.endpoint} ...", flush=True)
        server.start()
        try:
            yield server
        finally:
            try:
                server.stop()
            except (S3ServerError, subprocess.TimeoutExpired) as exc:  # the caller's own error matters more
                print(f"stopping the private S3 server failed: {exc}", flush=True)
    finally:
        if scratch is not None:
            scratch.cleanup()
