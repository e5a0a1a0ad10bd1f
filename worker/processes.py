"""Child processes for the demo and the tests: start in their own session, wait for HTTP, stop the group."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path


def spawn(args: list[str], log: Path, env: Mapping[str, str] | None = None) -> subprocess.Popen:
    """Start `args` in a new session (so `stop` can end its whole process group), output into `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(args, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True,
                            env=dict(env) if env is not None else None)


def stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def python_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", *args]


def wait_http(url: str, timeout: float = 60) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not come up within {timeout:.0f} s")
