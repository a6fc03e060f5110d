"""Processes and commands: errors, cleanup steps, names, the process table, ``Process``.

The lowest layer of :mod:`lab`: everything else builds on these.  Failure behaviour:
:func:`run_command` raises :class:`CommandError` (with the output's tails) on a non-zero
exit; :class:`Cleanup` never lets one failed step stop the later ones; every wait here
(:func:`kill_until_gone`, :meth:`Process.stop`, :func:`run_bounded`) is bounded.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self

if TYPE_CHECKING:
    from lab.netns import Netns

__all__ = [
    "IFNAMSIZ_MAX",
    "KILL_TIMEOUT",
    "NAME_PREFIX",
    "NETNS_DIR",
    "Cleanup",
    "CommandError",
    "HarnessError",
    "Managed",
    "Process",
    "TeardownError",
    "cmdline",
    "descendants",
    "is_alive",
    "kill_until_gone",
    "pids_with_arg",
    "run_bounded",
    "run_command",
    "unique_name",
]

_log = logging.getLogger(__name__)

NAME_PREFIX = "cnmt"
"""Every name created by the lab starts with this."""
IFNAMSIZ_MAX = 15
"""Longest Linux interface / namespace name the lab produces."""
NETNS_DIR = Path("/run/netns")
"""Where ``ip netns`` keeps its named namespaces."""
KILL_TIMEOUT = 10.0
"""Bound, in seconds, on waiting for processes to die after ``SIGKILL``."""


# --------------------------------------------------------------------------------------------
# errors


class HarnessError(RuntimeError):
    """The lab could not set something up, or could not prove something was torn down."""


class CommandError(subprocess.CalledProcessError):
    """A command exited non-zero; ``str()`` includes the tails of its stdout and stderr."""

    def __str__(self) -> str:
        text = super().__str__()
        for label, data in (("stdout", self.stdout), ("stderr", self.stderr)):
            if data:
                body = data if isinstance(data, str) else data.decode(errors="replace")
                text += f"\n--- {label} (tail) ---\n{body[-2000:]}"
        return text


class TeardownError(ExceptionGroup[Exception]):
    """One or more cleanup steps failed; every step was still attempted."""


class Cleanup:
    """Runs cleanup steps, never letting one failure stop the later steps.

    Invariant: :meth:`step` never raises an ``Exception``; failures are logged with traceback
    and kept.  :meth:`finish` raises :class:`TeardownError` with all of them iff
    ``raise_errors`` is true and at least one step failed.
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self.errors: list[Exception] = []

    def step(self, desc: str, fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception as exc:
            _log.error("%s: cleanup step %r failed: %s", self.what, desc, exc, exc_info=True)
            exc.add_note(f"{self.what}: while {desc}")
            self.errors.append(exc)

    def finish(self, raise_errors: bool) -> None:
        if self.errors and raise_errors:
            raise TeardownError(
                f"{self.what}: {len(self.errors)} cleanup step(s) failed", self.errors
            )


class Managed:
    """A lab object used as a context manager: ``with obj:`` runs :meth:`_open`, and on
    leaving :meth:`_close` with ``raise_errors`` true iff the body did not raise, so a
    cleanup error never masks the body's own error.  Each class points the two at its own
    methods (``_open = create``, ``_close = delete``, ...); ``_open`` either fully succeeds
    or undoes what it did and re-raises, ``_close`` runs every step and is idempotent."""

    def _open(self) -> Self:
        raise NotImplementedError

    def _close(self, raise_errors: bool) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self._open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._close(raise_errors=exc_type is None)


# --------------------------------------------------------------------------------------------
# names and small helpers

_name_lock = threading.Lock()
_issued: set[str] = set()
_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
_SUFFIX_LEN = 6


def unique_name(prefix: str = NAME_PREFIX) -> str:
    """Return a fresh name ``<prefix><6 random [a-z0-9]>`` of at most 15 characters.

    ``prefix`` is forced to start with ``cnmt`` (prepended if missing) so every lab
    object is recognisable.  The name is unique within this process and, with 36**6 random
    choices, also checked against existing ``/run/netns`` entries and interfaces of the root
    namespace.  Raises ``ValueError`` if the prefix is too long or has characters other than
    ``[a-z0-9-]``.
    """
    if not prefix.startswith(NAME_PREFIX):
        prefix = NAME_PREFIX + prefix
    if len(prefix) + _SUFFIX_LEN > IFNAMSIZ_MAX:
        raise ValueError(f"prefix {prefix!r} too long: names must be <= {IFNAMSIZ_MAX} chars")
    if any(c not in _ALPHABET + "-" for c in prefix):
        raise ValueError(f"prefix {prefix!r} must match [a-z0-9-]*")
    with _name_lock:
        for _ in range(100):
            name = prefix + "".join(secrets.choice(_ALPHABET) for _ in range(_SUFFIX_LEN))
            if name in _issued or (NETNS_DIR / name).exists():
                continue
            if Path("/sys/class/net", name).exists():
                continue
            _issued.add(name)
            return name
    raise HarnessError(f"could not find a free name with prefix {prefix!r}")


def run_command(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 30,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``subprocess.run`` in text mode with captured output; raises :class:`CommandError`.

    On timeout the child is killed by ``subprocess.run`` and ``TimeoutExpired`` propagates.
    """
    proc = subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
        env=dict(env) if env is not None else None,
        check=False,
        stdin=None if input is not None else subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        raise CommandError(proc.returncode, proc.args, proc.stdout, proc.stderr)
    return proc


def _tail(path: Path, n: int) -> str:
    """Last ``n`` lines of ``path`` (empty string if it does not exist)."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 256 * 1024))
            data = fh.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(data.splitlines()[-n:])


# --------------------------------------------------------------------------------------------
# process table


def _proc_stat(pid: int) -> tuple[int, str] | None:
    """``(ppid, state)`` of ``pid`` from ``/proc``, or ``None`` if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return int(fields[1]), fields[0]


def is_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (zombies hold no resources)."""
    st = _proc_stat(pid)
    return st is not None and st[1] not in ("Z", "X")


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def descendants(roots: Iterable[int]) -> set[int]:
    """``roots`` plus every (transitive) child of them, from one scan of ``/proc``."""
    children: dict[int, list[int]] = {}
    for pid in _all_pids():
        st = _proc_stat(pid)
        if st is not None:
            children.setdefault(st[0], []).append(pid)
    result: set[int] = set()
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid in result:
            continue
        result.add(pid)
        todo.extend(children.get(pid, ()))
    return result


def _protected_pids() -> set[int]:
    """This process and its ancestors: never killed, whatever a scan returns."""
    out: set[int] = set()
    pid = os.getpid()
    for _ in range(256):
        if pid <= 1 or pid in out:
            break
        out.add(pid)
        st = _proc_stat(pid)
        if st is None:
            break
        pid = st[0]
    out.add(1)
    return out


def kill_until_gone(
    targets: Callable[[], set[int]], what: str, timeout: float = KILL_TIMEOUT
) -> None:
    """SIGKILL everything ``targets()`` returns, rescanning, until nothing is alive.

    ``targets`` is re-evaluated each round so processes forked during the kill are caught.
    At most 20 rounds and ``timeout`` seconds; raises :class:`HarnessError` listing the
    survivors otherwise.  Zombies count as gone.
    """
    protected = _protected_pids()
    deadline = time.monotonic() + timeout
    alive: set[int] = set()
    for _ in range(20):
        alive = {p for p in targets() - protected if is_alive(p)}
        if not alive:
            return
        _log.info("%s: SIGKILL %s", what, sorted(alive))
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        round_end = min(deadline, time.monotonic() + 1.0)
        while time.monotonic() < round_end and any(is_alive(p) for p in alive):
            time.sleep(0.05)
        if time.monotonic() >= deadline:
            break
    alive = {p for p in targets() - protected if is_alive(p)}
    if alive:
        desc = {p: " ".join(cmdline(p))[:200] for p in sorted(alive)}
        raise HarnessError(f"{what}: processes survived SIGKILL for {timeout}s: {desc}")


def pids_with_arg(needle: str) -> list[int]:
    """Live (non-zombie) pids having an argv element that equals or contains ``needle``."""
    return sorted(
        pid for pid in _all_pids() if any(needle in arg for arg in cmdline(pid)) and is_alive(pid)
    )


# --------------------------------------------------------------------------------------------
# long running processes


class Process(Managed):
    """A long-running command in its own session/process group, output to a log file.

    Invariants: stdin is ``/dev/null``; stdout and stderr are appended to ``log_path``; the
    child is a session leader, so ``pgid == pid``.  :meth:`stop` signals the whole group,
    escalates to SIGKILL after ``timeout``, SIGKILLs any group members left after the leader
    died (checked before the leader is reaped, so the pgid cannot be recycled meanwhile), and
    reaps the leader.  It is idempotent and bounded; it raises :class:`HarnessError` only if
    the leader survives SIGKILL.
    """

    def __init__(
        self,
        argv: Sequence[str],
        log_path: str | os.PathLike[str],
        *,
        netns: Netns | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        name: str | None = None,
    ) -> None:
        self.argv = list(argv)
        self.log_path = Path(log_path)
        self.netns = netns
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.name = name or Path(self.argv[0]).name
        self._popen: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"Process({self.name!r}, pid={self.pid if self._popen else None})"

    def start(self) -> Self:
        """Start the command; raises if already started."""
        if self._popen is not None:
            raise HarnessError(f"{self.name}: already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        argv = self.netns.wrap(self.argv) if self.netns is not None else self.argv
        with self.log_path.open("ab") as log:
            log.write(f"=== {time.strftime('%H:%M:%S')} start: {argv}\n".encode())
            log.flush()
            self._popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        if self._popen is None:
            raise HarnessError(f"{self.name}: not started")
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        return None if self._popen is None else self._popen.returncode

    def poll(self) -> int | None:
        """Exit status if it exited (reaping it), else ``None``."""
        return None if self._popen is None else self._popen.poll()

    def is_running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the leader only (e.g. SIGSTOP, SIGCONT); nothing once it is reaped."""
        if self._popen is None:
            raise HarnessError(f"{self.name}: not started")
        self._popen.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """Wait for exit; raises ``subprocess.TimeoutExpired`` after ``timeout``."""
        if self._popen is None:
            raise HarnessError(f"{self.name}: not started")
        return self._popen.wait(timeout=timeout)

    def _exited_unreaped(self) -> bool:
        """True if the leader exited; leaves it a zombie so its pgid stays reserved."""
        assert self._popen is not None
        if self._popen.returncode is not None:
            return True
        try:
            res = os.waitid(os.P_PID, self._popen.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        return res is not None

    def _wait_unreaped(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if self._exited_unreaped():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def _killpg(self, sig: int) -> None:
        assert self._popen is not None
        if self._popen.returncode is not None:
            return  # reaped: the pgid may belong to someone else now
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._popen.pid, sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int | None:
        """Signal the group with ``sig``; SIGKILL after ``timeout``; return the exit status.

        Returns ``None`` if never started.  Bounded by ``timeout + ~10 s``.
        """
        if self._popen is None:
            return None
        if self._popen.returncode is None:
            self._killpg(sig)
            if not self._wait_unreaped(timeout):
                _log.warning("%s: no exit %.0fs after signal %d, SIGKILL", self.name, timeout, sig)
                self._killpg(signal.SIGKILL)
                if not self._wait_unreaped(KILL_TIMEOUT):
                    raise HarnessError(f"{self.name} (pid {self.pid}) survived SIGKILL")
            self._killpg(signal.SIGKILL)  # stragglers left in the group
        try:
            return self._popen.wait(timeout=KILL_TIMEOUT)
        except subprocess.TimeoutExpired as exc:
            raise HarnessError(f"{self.name} (pid {self.pid}) could not be reaped") from exc

    def log_tail(self, n: int = 50) -> str:
        """The last ``n`` lines of the log file."""
        return _tail(self.log_path, n)

    _open = start

    def _close(self, raise_errors: bool) -> None:
        cleanup = Cleanup(f"process {self.name}")
        cleanup.step("stop", self.stop)
        cleanup.finish(raise_errors)


# --------------------------------------------------------------------------------------------
# bounded runs of whole programs


def run_bounded(
    argv: Sequence[str],
    timeout: float,
    *,
    cwd: str | os.PathLike[str] | None = None,
    stop_signal: int = signal.SIGTERM,
    grace: float = 120,
) -> tuple[int | None, str]:
    """Run ``argv`` to its end; ``(exit status, output)``, or ``(None, output)`` on a timeout.

    stdout and stderr are captured together.  After ``timeout`` seconds it gets
    ``stop_signal`` (so it can unwind its own teardown), after ``grace`` more ``SIGKILL``;
    reading what it printed after that is bounded too (a grandchild may hold the pipe).
    If the wait itself is interrupted (e.g. ``KeyboardInterrupt``) it is killed and reaped
    before the interruption propagates, so it never outlives the call.
    """
    proc = subprocess.Popen(
        list(argv), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        try:
            output, _ = proc.communicate(timeout=timeout)
            return proc.returncode, output
        except subprocess.TimeoutExpired:
            proc.send_signal(stop_signal)
            try:
                output, _ = proc.communicate(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                try:
                    output, _ = proc.communicate(timeout=KILL_TIMEOUT)
                except subprocess.TimeoutExpired:
                    output = f"(no output: the pipe stayed open {KILL_TIMEOUT:.0f}s after SIGKILL)"
            return None, output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=KILL_TIMEOUT)
        if proc.stdout is not None:
            proc.stdout.close()
