"""Which code ran: a result names its commit in a checkout (git) and in the Docker image (baked in)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from worker.engine import device

REPO = Path(__file__).resolve().parents[2]


def _code_version_in(tree: Path) -> str:
    """code_version() as a process sees it that imports the engine from `tree` (a copy without .git)."""
    script = ("import worker.engine.device as d, sys; assert d.__file__.startswith(sys.argv[1]), d.__file__; "
              "print(d.code_version())")
    out = subprocess.run([sys.executable, "-c", script, str(tree)], cwd=tree, env={"PYTHONPATH": str(tree)},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_a_checkout_names_its_git_commit():
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    if not head:
        pytest.skip("not a git checkout")
    device.code_version.cache_clear()
    assert device.code_version() == head


@pytest.mark.slow  # copies the package and starts a fresh interpreter: ~8 s, kept out of the quick loop
def test_an_image_without_git_names_the_commit_baked_in_at_build(tmp_path):
    # What Dockerfile.gpu does: copy the code (no .git), then write the build arg where the engine reads it.
    dockerfile = (REPO / "Dockerfile.gpu").read_text()
    m = re.search(r'^RUN echo "\$HPARENA_COMMIT" > (\S+)$', dockerfile, re.M)
    assert m, "Dockerfile.gpu must bake HPARENA_COMMIT into the image"
    assert REPO / m.group(1) == device.BUILD_COMMIT_FILE
    tree = tmp_path / "image"
    shutil.copytree(REPO / "worker", tree / "worker", ignore=shutil.ignore_patterns("__pycache__", "BUILD_COMMIT"))
    assert _code_version_in(tree) == "unknown"  # no .git and nothing baked: says so rather than guessing
    (tree / m.group(1)).write_text("abc1234\n")
    assert _code_version_in(tree) == "abc1234"
