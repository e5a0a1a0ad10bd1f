"""Throwaway servers for the chaos tests: a Redis and a PostgreSQL cluster each test owns, so that killing
or stopping them touches nothing else on the machine (never the shared :6379 Redis or :5432 PostgreSQL).

Redis runs as production here runs it, without persistence: a restart comes back empty. PostgreSQL is a
fresh `initdb` cluster in a temporary directory; Debian keeps initdb and pg_ctl off PATH (under
/usr/lib/postgresql/<version>/bin) and initdb refuses to run as root, so as root they run as `postgres`.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from sqlalchemy import create_engine, text

from worker.processes import spawn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


# ----------------------------------------------------------------------------------------------------
# Redis
# ----------------------------------------------------------------------------------------------------


class RedisServer:
    """`redis-server` on its own port, no RDB snapshots and no AOF: a restart starts empty."""

    def __init__(self, log: Path):
        self.port = free_port()
        self.log = log
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = spawn(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                           "--appendonly", "no", "--protected-mode", "no"], self.log)
        wait_port(self.port)

    def kill(self) -> None:
        """SIGKILL, as a crashed or OOM-killed Redis goes: no goodbye to its clients."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


# ----------------------------------------------------------------------------------------------------
# PostgreSQL
# ----------------------------------------------------------------------------------------------------


def pg_bindir() -> Path | None:
    """The newest installed PostgreSQL's bin directory holding initdb, or None."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent

    def version(d: Path) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", d.parent.name)) or (0,)

    dirs = [d for d in Path("/usr/lib/postgresql").glob("*/bin") if (d / "initdb").exists()]
    return max(dirs, key=version) if dirs else None


class PgCluster:
    """A private cluster: `initdb -A trust` into a temporary directory, served on a spare port of
    127.0.0.1 with its socket in that directory. `stop` and `start` keep the data directory."""

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.port = free_port()
        # Not under pytest's tmp_path: that sits in a root-only 0700 directory `postgres` can't enter.
        self.dir = Path(tempfile.mkdtemp(prefix="hparena-pg-"))
        self.as_postgres: list[str] = []
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self.as_postgres = ["runuser", "-u", "postgres", "--"]
        self.data = self.dir / "data"
        try:
            self._pg(["initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                      "--locale=C", "--no-sync"])
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def _pg(self, args: list[str], timeout: float = 120) -> None:
        cmd = [*self.as_postgres, str(self.bindir / args[0]), *args[1:]]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        # fsync off: this cluster is thrown away, and `stop -m fast` checkpoints cleanly anyway.
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.dir} "
                   "-c fsync=off -c max_connections=200")
        self._pg(["pg_ctl", "-D", str(self.data), "-l", str(self.dir / "server.log"), "-o", options, "-w",
                  "-t", "60", "start"])

    def stop(self) -> None:
        """A fast shutdown: open transactions are rolled back and every client is disconnected."""
        self._pg(["pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop"])

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def create_database(self, name: str) -> str:
        admin = create_engine(self.url(), isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
        return self.url(name)

    def destroy(self) -> None:
        try:
            if self.running():
                self._pg(["pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "-t", "60", "stop"])
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return (self.dir / "server.log").read_text()[-chars:]
        except OSError:
            return ""


def wait_for(predicate, timeout: float, what: str, log: Path):
    """Poll `predicate` until it returns something truthy (returned); past `timeout` fail, showing `log`'s tail."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; log tail:\n{log.read_text()[-4000:]}")
