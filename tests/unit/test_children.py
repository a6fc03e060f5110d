"""Child supervision with real, tiny processes (no root needed)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from calicnm.errors import CalicnmError
from calicnm.node.children import Child, wait_for


def gone(pid: int) -> bool:
    """No such process, or only its zombie is left."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_start_alive_and_stop_by_sigterm(tmp_path):
    child = Child("sleeper", ["sleep", "30"], log_path=str(tmp_path / "sleeper.log"))
    assert not child.alive()
    child.start()
    try:
        assert child.alive()
    finally:
        child.stop(timeout=2)
    assert not child.alive()
    assert child.proc is not None and child.proc.returncode == -signal.SIGTERM


def test_a_child_ignoring_sigterm_is_killed_with_its_process_group(tmp_path):
    log = tmp_path / "stubborn.log"
    script = "trap '' TERM; sleep 30 & echo grandchild $!; echo ready; wait"
    child = Child("stubborn", ["sh", "-c", script], log_path=str(log))
    child.start()
    try:
        wait_for(lambda: "ready" in log.read_text(), "the trap", timeout=2, interval=0.01)
        grandchild = int(log.read_text().split("grandchild ")[1].split()[0])
        started = time.monotonic()
        child.stop(timeout=0.2)
        assert time.monotonic() - started < 2
    finally:
        child.stop(timeout=0.2)
    assert child.proc is not None and child.proc.returncode == -signal.SIGKILL
    wait_for(lambda: gone(grandchild), "the grandchild to die", timeout=2, interval=0.01)


def test_output_goes_to_the_log_file_and_is_appended_across_restarts(tmp_path):
    log = tmp_path / "talker.log"
    child = Child("talker", ["sh", "-c", "echo out; echo err >&2"], log_path=str(log))
    for _ in range(2):
        child.start()
        wait_for(lambda: not child.alive(), "the talker to exit", timeout=2, interval=0.01)
        child.stop(timeout=1)
        assert child.proc is not None and child.proc.returncode == 0
    assert sorted(log.read_text().splitlines()) == ["err", "err", "out", "out"]


def test_the_child_gets_the_given_environment_only(tmp_path):
    log = tmp_path / "env.log"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "ONLY": "this"}
    child = Child("env", ["sh", "-c", "echo ONLY=$ONLY HOME=$HOME"], env=env, log_path=str(log))
    child.start()
    wait_for(lambda: not child.alive(), "env to exit", timeout=2, interval=0.01)
    child.stop()
    assert log.read_text() == "ONLY=this HOME=\n"


def test_stopping_a_child_never_started_or_already_gone_is_harmless(tmp_path):
    Child("never", ["true"]).stop()
    child = Child("quick", ["true"], log_path=str(tmp_path / "quick.log"))
    child.start()
    wait_for(lambda: not child.alive(), "true to exit", timeout=2, interval=0.01)
    child.stop(timeout=0.1)
    child.stop(timeout=0.1)
    assert not child.alive()


def test_wait_for_returns_once_true_and_gives_up_after_its_timeout():
    wait_for(lambda: True, "nothing", timeout=0.01)
    started = time.monotonic()
    with pytest.raises(CalicnmError, match="waiting for the impossible"):
        wait_for(lambda: False, "the impossible", timeout=0.1, interval=0.02)
    assert 0.1 <= time.monotonic() - started < 1
