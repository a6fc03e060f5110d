"""This host's BIRD: the only module that runs ``bird`` and ``birdc``.

BIRD runs as its own daemon, not as a child of the node, so a node that
crashes or is killed leaves routing up; a restarted node finds it through
its control socket and only reconfigures it.  A clean node stop shuts it
down, which withdraws the host's routes from its peers at once.

A new configuration is checked (``bird -p``) before it replaces the old
one, and applied with ``birdc configure``: sessions whose settings did not
change stay up.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess

from calicnm.errors import DataplaneError

_log = logging.getLogger(__name__)


class Bird:
    def __init__(self, state_dir: str, timeout: float = 15.0) -> None:
        self.conf = os.path.join(state_dir, "bird.conf")
        self.ctl = os.path.join(state_dir, "bird.ctl")
        self.pidfile = os.path.join(state_dir, "bird.pid")
        self.log = os.path.join(state_dir, "bird.log")
        self._timeout = timeout
        self._applied: str | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("bird") is not None and shutil.which("birdc") is not None

    def _run(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=self._timeout)
        except (OSError, subprocess.SubprocessError) as exc:
            raise DataplaneError(f"{argv[0]} failed to run: {exc}") from exc

    def birdc(self, *command: str) -> str:
        proc = self._run(["birdc", "-s", self.ctl, *command])
        if proc.returncode != 0:
            raise DataplaneError(f"birdc {' '.join(command)}: {proc.stdout.strip()[-300:]}")
        return proc.stdout

    def running(self) -> bool:
        if not os.path.exists(self.ctl):
            return False
        return self._run(["birdc", "-s", self.ctl, "show", "status"]).returncode == 0

    def apply(self, config: str) -> bool:
        """Make BIRD run ``config``; True if anything had to change."""
        if config == self._applied and self.running():
            return False
        candidate = self.conf + ".new"
        try:
            with open(candidate, "w") as fh:
                fh.write(config)
        except OSError as exc:
            raise DataplaneError(f"cannot write {candidate}: {exc.strerror}") from exc
        check = self._run(["bird", "-p", "-c", candidate])
        if check.returncode != 0:
            raise DataplaneError(f"generated BIRD configuration rejected: {check.stderr.strip()}")
        os.replace(candidate, self.conf)
        if self.running():
            out = self.birdc("configure")
            if "Reconfigured" not in out and "Reconfiguration in progress" not in out:
                _log.info("bird configure: %s", out.strip().splitlines()[-1:])
            _log.info("bird reconfigured conf=%s", self.conf)
        else:
            started = self._run(["bird", "-c", self.conf, "-s", self.ctl, "-P", self.pidfile])
            if started.returncode != 0:
                raise DataplaneError(f"bird did not start: {started.stderr.strip()}")
            _log.info("bird started conf=%s ctl=%s", self.conf, self.ctl)
        self._applied = config
        return True

    def protocols(self) -> str:
        return self.birdc("show", "protocols")

    def stop(self) -> None:
        """Shut BIRD down cleanly (peers withdraw this host's routes)."""
        if self.running():
            self._run(["birdc", "-s", self.ctl, "down"])
            _log.info("bird stopped")
        self._applied = None
