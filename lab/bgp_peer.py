"""``BirdPeer``: an outside BGP router for tests, a BIRD of the test's own in a namespace.

It announces the prefixes it is given (static blackholes, exported to every neighbour) and
imports whatever its neighbours send into its own table only: it has no kernel protocol, so
it never touches any routing table.  It can carry a TCP MD5 password and TTL security
(GTSM), and change either with :meth:`BirdPeer.reconfigure`.

BIRD runs in the foreground (``bird -f -c CONF -s CTL -P PID``) as a :class:`lab.procs.Process`
in the namespace, so stopping it is bounded and takes its whole process group; its files live
in the caller's ``workdir``.  Every wait is bounded.
"""

from __future__ import annotations

import functools
import shutil
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from lab.netns import Netns
from lab.procs import Cleanup, HarnessError, Managed, Process, run_command

__all__ = ["BirdPeer", "Neighbor", "protocol_states"]

READY_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0


@dataclass(frozen=True)
class Neighbor:
    ip: str
    as_num: int

    @property
    def protocol(self) -> str:
        return "peer_" + self.ip.replace(".", "_")


def protocol_states(birdc_show_protocols: str) -> dict[str, str]:
    """``birdc show protocols`` -> {protocol name: its State and Info columns}."""
    rows = {}
    for line in birdc_show_protocols.splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[1] == "BGP":
            rows[parts[0]] = " ".join([parts[3], *parts[5:]])
    return rows


class BirdPeer(Managed):
    """A BGP router at ``address`` in ``netns`` with AS ``as_num``.

    :meth:`start` either fully succeeds (BIRD answers on its control socket) or stops what
    it started and raises.  :meth:`stop` is idempotent and bounded (SIGTERM, SIGKILL after
    10 s, via :class:`~lab.procs.Process`) and removes the control socket and pid file.
    """

    def __init__(
        self,
        netns: Netns,
        address: str,
        as_num: int,
        workdir: Path,
        neighbors: Sequence[Neighbor],
        announce: Sequence[str],
        password: str | None = None,
        ttl_security: bool = False,
    ) -> None:
        self.netns = netns
        self.address = address
        self.as_num = as_num
        self.workdir = workdir
        self.neighbors = list(neighbors)
        self.announce = list(announce)
        self.password = password
        self.ttl_security = ttl_security
        self.conf = workdir / "bird.conf"
        self.ctl = workdir / "bird.ctl"
        self.pidfile = workdir / "bird.pid"
        self.process: Process | None = None

    def render(self) -> str:
        session = []
        if self.password is not None:
            if '"' in self.password or "\\" in self.password:
                raise ValueError("the test router's password cannot hold quotes or backslashes")
            session.append(f'  password "{self.password}";')
        if self.ttl_security:
            session.append("  ttl security on;")
        lines = [
            f"# Test BGP router {self.address} (lab.bgp_peer); no kernel protocol.",
            f"router id {self.address};",
            "protocol device { scan time 10; }",
            "",
            "protocol static announce {",
            "  ipv4;",
            *(f"  route {prefix} blackhole;" for prefix in self.announce),
            "}",
            "",
            "template bgp host {",
            f"  local {self.address} as {self.as_num};",
            *session,
            # Short timers: a session this router could not finish (a peer dropping its
            # packets: no password, TTL below the peer's minimum) is dropped within seconds,
            # not after BGP's default 240 s hold time, and retried at once.
            "  connect delay time 1;",
            "  connect retry time 2;",
            "  error wait time 1, 2;",
            "  startup hold time 6;",
            "  hold time 6;",
            '  ipv4 { import all; export where proto = "announce"; };',
            "}",
            "",
        ]
        for n in self.neighbors:
            lines += [
                f"protocol bgp {n.protocol} from host {{",
                f"  neighbor {n.ip} as {n.as_num};",
                "}",
                "",
            ]
        return "\n".join(lines)

    def _write_config(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        candidate = self.workdir / "bird.conf.new"
        candidate.write_text(self.render())
        run_command(["bird", "-p", "-c", str(candidate)], timeout=30)
        candidate.replace(self.conf)

    def birdc(self, *command: str, timeout: float = 10) -> str:
        return run_command(["birdc", "-s", str(self.ctl), *command], timeout=timeout).stdout

    def answering(self) -> bool:
        if not self.ctl.exists():
            return False
        got = run_command(["birdc", "-s", str(self.ctl), "show", "status"], check=False, timeout=10)
        return got.returncode == 0 and "Daemon is up" in got.stdout

    def start(self) -> Self:
        if shutil.which("bird") is None or shutil.which("birdc") is None:
            raise HarnessError("bird is not installed (the bird2 package)")
        try:
            self._write_config()
            argv = [
                "bird",
                "-f",
                "-c",
                str(self.conf),
                "-s",
                str(self.ctl),
                "-P",
                str(self.pidfile),
            ]
            self.process = self.netns.process(argv, self.workdir / "bird.log", name="bird").start()
            deadline = time.monotonic() + READY_TIMEOUT
            while not self.answering():
                if not self.process.is_running():
                    raise HarnessError(f"test router's bird exited:\n{self.process.log_tail(20)}")
                if time.monotonic() > deadline:
                    raise HarnessError(f"test router's bird not up in {READY_TIMEOUT:.0f} s")
                time.sleep(0.1)
        except BaseException:
            self.stop(raise_errors=False)
            raise
        return self

    def reconfigure(self, *, password: str | None, ttl_security: bool) -> None:
        """Set the password (None: none) and TTL security, and have BIRD reload: the
        sessions whose settings changed restart."""
        self.password = password
        self.ttl_security = ttl_security
        self._write_config()
        out = self.birdc("configure")
        if "Reconfigured" not in out and "Reconfiguration in progress" not in out:
            raise HarnessError(f"test router refused its new configuration: {out.strip()}")

    def protocols(self) -> dict[str, str]:
        return protocol_states(self.birdc("show", "protocols"))

    def stop(self, raise_errors: bool = True) -> None:
        cleanup = Cleanup(f"test router {self.address}")
        if self.process is not None:
            process = self.process
            cleanup.step("stopping bird", lambda: process.stop(signal.SIGTERM, STOP_TIMEOUT))
        for path in (self.ctl, self.pidfile, self.workdir / "bird.conf.new"):
            cleanup.step(f"removing {path.name}", functools.partial(path.unlink, missing_ok=True))
        cleanup.finish(raise_errors)

    _open = start
    _close = stop
