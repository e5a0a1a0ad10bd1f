"""What the worker's parent writes on a run whose training child died (tests/e2e kills real children)."""

import pytest

from worker.tasks import lost_child_reason


@pytest.mark.parametrize(("pool", "expected"), [
    ("Worker exited prematurely: signal 6 (SIGABRT) Job: 2.", "aborted by native code"),
    ("Worker exited prematurely: signal 11 (SIGSEGV) Job: 0.", "crashed in native code (invalid memory access)"),
    ("Worker exited prematurely: signal 9 (SIGKILL) Job: 0.", "out-of-memory killer"),
    ("Worker exited prematurely: exitcode 70 Job: 1.", "exited unexpectedly (exitcode 70)"),
])
def test_a_dead_child_is_described_in_plain_words(pool, expected):
    reason = lost_child_reason(pool, "gpu-3@node")
    assert reason.startswith("the training process on gpu-3@node ") and expected in reason
    assert "Job:" not in reason
