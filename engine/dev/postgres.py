"""A throwaway PostgreSQL server on 127.0.0.1, for tests, benchmarks and local trials.

Like :class:`engine.dev.devchain.Anvil`: it initialises a cluster in a temporary directory,
starts ``postgres`` on a free port and stops it (and removes the directory) on exit. It needs
the PostgreSQL server binaries (``initdb``, ``postgres``; Debian: ``postgresql-15``) on ``PATH``
or in ``/usr/lib/postgresql/*/bin``. PostgreSQL refuses to run as root: under root the server
runs as the ``postgres`` user (or ``nobody``), which then owns the directory.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from .devchain import free_port


class PostgresUnavailable(RuntimeError):
    """The PostgreSQL server binaries are not installed."""


def find_binary(name: str) -> str:
    found = shutil.which(name)
    if found is not None:
        return found
    for candidate in sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True):
        return candidate
    raise PostgresUnavailable(
        f"{name} not found: install the PostgreSQL server (Debian: apt-get install postgresql)"
    )


def _run_as() -> tuple[list[str], int | None, int | None]:
    """The command prefix (and uid, gid) that drops root, or nothing when not root."""
    if os.geteuid() != 0:
        return [], None, None
    for user in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(user)
            prefix = ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}"]
            return [*prefix, "--clear-groups"], entry.pw_uid, entry.pw_gid
    raise PostgresUnavailable("running as root and no 'postgres' or 'nobody' user to run as")


class PostgresServer:
    """``with PostgresServer() as pg: pg.dsn`` – a superuser ``postgres`` with trust auth on
    127.0.0.1, database ``postgres``. :meth:`stop` and :meth:`start` restart it on the same
    port and data (fault tests)."""

    def __init__(self, port: int | None = None, *, settings: dict[str, str] | None = None) -> None:
        self.port = port or free_port()
        self._prefix, uid, gid = _run_as()
        self._root = Path(tempfile.mkdtemp(prefix="x402-pg-"))
        self.data = self._root / "data"
        if uid is not None and gid is not None:
            os.chown(self._root, uid, gid)
        self.settings = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(self._root),
            "max_connections": "200",
            "fsync": "on",
            "synchronous_commit": "on",
            **(settings or {}),
        }
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = self._root / "postgres.log"
        self._initdb()

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _initdb(self) -> None:
        cmd = [
            *self._prefix,
            find_binary("initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        ]
        done = subprocess.run(cmd, capture_output=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {done.stderr.decode(errors='replace')[-2000:]}")

    def start(self, timeout_s: float = 30.0) -> None:
        assert self._proc is None, "already running"
        args = [*self._prefix, find_binary("postgres"), "-D", str(self.data), "-p", str(self.port)]
        for key, value in self.settings.items():
            args += ["-c", f"{key}={value}"]
        log = open(self._log, "ab")  # noqa: SIM115 - the server's lifetime, closed in stop()
        self._proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout_s
        ready = [find_binary("pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-q"]
        while subprocess.run(ready, check=False).returncode != 0:
            if self._proc.poll() is not None or time.monotonic() > deadline:
                tail = self._log.read_text(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(f"postgres did not start: {tail}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Fast shutdown (SIGINT): open transactions roll back, committed ones stay."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> PostgresServer:
        try:
            self.start()
        except BaseException:
            shutil.rmtree(self._root, ignore_errors=True)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        shutil.rmtree(self._root, ignore_errors=True)
