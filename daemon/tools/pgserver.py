"""A private, throw-away PostgreSQL server for tests and benchmarks.

`PostgresServer.start()` runs Debian's `initdb` in a fresh temporary directory, starts `postgres`
on a free loopback port with its socket in that directory (so it never touches the system
cluster or /var/run/postgresql), creates one database and returns its SQLAlchemy URL. `stop()`
shuts it down and deletes the directory. The test fixture (tests/fixtures_pg.py) and
`patchd bench store` both use it, so the server they measure is the same. `restart()` restarts
the running server on the same data directory and port (`patchd bench chaos` cuts every session
of the daemon with it, as a database failover or an upgrade would).

PostgreSQL refuses to run as root; when we are root, every server command runs through
`runuser -u postgres --` and the directory is handed to that user.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

# user that owns the cluster when we run as root (created by Debian's postgresql-common)
SERVER_USER = "postgres"
# database the returned URL points at
DATABASE = "patchd"
# seconds pg_ctl waits for start-up/shut-down; a cold start on a busy 2-core machine takes ~2 s
PG_CTL_WAIT_S = 60


class PostgresUnavailable(RuntimeError):
    """The PostgreSQL server binaries are missing or the server did not start."""


def find_bindir() -> Path:
    """The directory holding initdb/pg_ctl: the newest /usr/lib/postgresql/N/bin, else PATH."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_major_version)
    if candidates:
        return Path(candidates[-1]).parent
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    raise PostgresUnavailable(
        "PostgreSQL server binaries (initdb, pg_ctl) not found under /usr/lib/postgresql/*/bin or on "
        "PATH; install them with deploy/system-deps.sh (apt-get install postgresql)"
    )


def _major_version(initdb_path: str) -> int:
    try:
        return int(Path(initdb_path).parent.parent.name.split(".")[0])
    except ValueError:
        return 0


def free_port() -> int:
    """A loopback TCP port that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PostgresServer:
    """One private cluster. Use as a context manager or call start()/stop()."""

    # fsync=off makes commits cheap for tests; benchmarks keep PostgreSQL's durable default
    durable: bool = True
    bindir: Path | None = None
    workdir: Path | None = field(default=None, init=False)
    port: int | None = field(default=None, init=False)
    # the server's command-line options (port included) once started: restart() passes them again
    options: str = field(default="", init=False)

    @property
    def url(self) -> str:
        if self.port is None:
            raise PostgresUnavailable("the private PostgreSQL server is not running")
        return f"postgresql+psycopg://{SERVER_USER}@127.0.0.1:{self.port}/{DATABASE}"

    def start(self) -> str:
        """Create, start and return the URL of a fresh cluster; raises PostgresUnavailable."""
        bindir = self.bindir or find_bindir()
        self.workdir = Path(tempfile.mkdtemp(prefix="patchd-pg-"))
        data = self.workdir / "data"
        if os.geteuid() == 0:
            shutil.chown(self.workdir, user=SERVER_USER, group=None)
        self._run(
            [
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                SERVER_USER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
            ]
        )
        options = [
            "-c listen_addresses=127.0.0.1",
            f"-k {self.workdir}",
            "-c max_connections=50",  # tests open a handful of pools; the default 100 wastes memory
        ]
        if not self.durable:
            options += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        last_error = ""
        for _ in range(3):  # the free port can be taken between free_port() and bind: retry
            port = free_port()
            result = self._run(
                [
                    str(bindir / "pg_ctl"),
                    "-D",
                    str(data),
                    "-l",
                    str(self.workdir / "server.log"),
                    "-w",
                    "-t",
                    str(PG_CTL_WAIT_S),
                    "-o",
                    " ".join([*options, f"-p {port}"]),
                    "start",
                ],
                check=False,
            )
            if result.returncode == 0:
                self.port = port
                self.options = " ".join([*options, f"-p {port}"])
                break
            last_error = self._log_tail()
        else:
            self._cleanup()
            raise PostgresUnavailable(f"PostgreSQL did not start; server log:\n{last_error}")
        self._run([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", SERVER_USER, DATABASE])
        return self.url

    def restart(self, mode: str = "fast") -> None:
        """`pg_ctl restart -m MODE` on the same data directory, port and options; returns once the
        server accepts connections again. "fast" rolls back open transactions and ends every
        session (the daemon's pooled connections and its model lock's session among them)."""
        if self.workdir is None or self.port is None:
            raise PostgresUnavailable("the private PostgreSQL server is not running")
        bindir = self.bindir or find_bindir()
        self._run(
            [
                str(bindir / "pg_ctl"),
                "-D",
                str(self.workdir / "data"),
                "-l",
                str(self.workdir / "server.log"),
                "-m",
                mode,
                "-w",
                "-t",
                str(PG_CTL_WAIT_S),
                "-o",
                self.options,
                "restart",
            ]
        )

    def stop(self) -> None:
        """Fast shutdown (rolls back open transactions) and delete the cluster directory."""
        if self.workdir is None:
            return
        if self.port is not None:
            bindir = self.bindir or find_bindir()
            self._run(
                [
                    str(bindir / "pg_ctl"),
                    "-D",
                    str(self.workdir / "data"),
                    "-m",
                    "fast",
                    "-w",
                    "-t",
                    str(PG_CTL_WAIT_S),
                    "stop",
                ],
                check=False,
            )
            self.port = None
        self._cleanup()

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self, argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        if os.geteuid() == 0:
            argv = ["runuser", "-u", SERVER_USER, "--", *argv]
        result = subprocess.run(argv, capture_output=True, text=True, cwd=self.workdir)
        if check and result.returncode != 0:
            raise PostgresUnavailable(
                f"{' '.join(argv)} failed ({result.returncode}):\n{result.stdout}{result.stderr}{self._log_tail()}"
            )
        return result

    def _log_tail(self) -> str:
        log = self.workdir / "server.log" if self.workdir else None
        if log is None or not log.exists():
            return ""
        return "\n".join(log.read_text(errors="replace").splitlines()[-20:])

    def _cleanup(self) -> None:
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
