"""``Netns``: a named network namespace, entered with ``nsenter``, always deleted whole."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self

from lab.procs import (
    IFNAMSIZ_MAX,
    KILL_TIMEOUT,
    NAME_PREFIX,
    NETNS_DIR,
    Cleanup,
    Managed,
    Process,
    descendants,
    kill_until_gone,
    run_command,
    unique_name,
)

__all__ = ["Netns"]


class Netns(Managed):
    """A named network namespace (``ip netns add``) with ``lo`` up.

    Invariants: while created, ``/run/netns/<name>`` exists and ``lo`` is up.  :meth:`delete`
    kills every process in the namespace (plus all their descendants, which catches container
    processes living in child namespaces) and then deletes it; it is idempotent.  Commands run
    via ``nsenter --net=/run/netns/<name>`` so they keep the caller's mount namespace (unlike
    ``ip netns exec``, which remounts ``/sys``).
    """

    def __init__(self, name: str | None = None) -> None:
        self.name = name or unique_name(NAME_PREFIX)
        if len(self.name) > IFNAMSIZ_MAX:
            raise ValueError(f"netns name {self.name!r} longer than {IFNAMSIZ_MAX}")
        self.created = False

    def __repr__(self) -> str:
        return f"Netns({self.name!r})"

    @property
    def path(self) -> Path:
        """The nsfs bind mount ``/run/netns/<name>``."""
        return NETNS_DIR / self.name

    def exists(self) -> bool:
        return self.path.exists()

    def create(self) -> Self:
        """Create the namespace and bring ``lo`` up; on failure nothing is left behind."""
        run_command(["ip", "netns", "add", self.name])
        self.created = True
        try:
            self.run(["ip", "link", "set", "lo", "up"])
        except BaseException:
            self.delete(raise_errors=False)
            raise
        return self

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed so that it runs inside this namespace."""
        return ["nsenter", f"--net={self.path}", "--", *argv]

    def run(
        self,
        argv: Sequence[str],
        check: bool = True,
        timeout: float = 30,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the namespace (text mode, output captured).

        Raises :class:`CommandError` on non-zero exit if ``check``; on timeout the command is
        killed and ``subprocess.TimeoutExpired`` propagates.
        """
        return run_command(self.wrap(argv), check=check, timeout=timeout, input=input, env=env)

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """``subprocess.Popen`` of ``argv`` inside the namespace; the caller must reap it."""
        return subprocess.Popen(self.wrap(argv), **kw)

    def process(self, argv: Sequence[str], log_path: str | os.PathLike[str], **kw: Any) -> Process:
        """A not-yet-started :class:`Process` running ``argv`` in this namespace."""
        return Process(argv, log_path, netns=self, **kw)

    def pids(self) -> list[int]:
        """Pids whose network namespace is this one (``ip netns pids``); [] if none/absent."""
        if not self.exists():
            return []
        out = run_command(["ip", "netns", "pids", self.name], timeout=30).stdout
        return [int(tok) for tok in out.split()]

    def kill_all(self, timeout: float = KILL_TIMEOUT) -> None:
        """SIGKILL every process in the namespace and all their descendants, bounded.

        Raises :class:`HarnessError` if some survive ``timeout`` seconds.
        """
        kill_until_gone(lambda: descendants(self.pids()), f"netns {self.name}", timeout)

    def delete(self, raise_errors: bool = True) -> None:
        """Kill all processes in it, then delete the namespace.  Idempotent.

        All steps are attempted; failures raise :class:`TeardownError` at the end if
        ``raise_errors`` (otherwise they are only logged).
        """
        cleanup = Cleanup(f"netns {self.name}")
        if self.exists():
            cleanup.step("killing processes", self.kill_all)
            cleanup.step("ip netns del", lambda: run_command(["ip", "netns", "del", self.name]))
        self.created = False
        cleanup.finish(raise_errors)

    _open = create
    _close = delete
