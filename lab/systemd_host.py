"""``SystemdHost``: a Debian host whose PID 1 is a real systemd, with calicnm installed as
the README's "Run it with systemd" says, for tests of the units themselves.

Design.  The machine is a ``systemd-nspawn -b`` container booted from a debootstrap
rootfs (:func:`systemd_rootfs_tar`, cached in :data:`ROOTFS_TAR`).  Each host extracts its
own copy, installs calicnm the way an operator would (a virtualenv holding this checkout's
wheel, ``/usr/local/bin/calicnm``, ``make install-systemd``, an edited
``/etc/calicnm/calicnm.env``, ``systemctl enable calicnm docker``) and boots it.  The
wheel stands in for ``make deps``, which would fetch packages from inside the machine;
the rootfs already holds the Debian packages that ``make deps`` installs.  Inside,
systemd starts containerd, Docker and the calicnm node from their units, so boot ordering,
``Type=notify`` readiness, ``Restart=always`` and reboots are systemd's own.

The host's network is a namespace of its own, attached to a :class:`~lab.fabric.Fabric`
at a fixed address and handed to nspawn (``--network-namespace-path``).  A reboot
(:meth:`SystemdHost.reboot`) is ``systemctl reboot`` inside: nspawn exits with 133, the
namespace is deleted and a fresh one with the same address is made before the next boot,
so nothing of the kernel's network state (veths, routes, iptables, ipsets) survives a
reboot, as on real hardware.  Disk state (``/var/lib/docker``, ``/var/lib/calicnm``) does.

What this machine needs from nspawn (each found by trying): a cgroup v2 hierarchy inside
(``SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1``; nspawn mounts the v1 controllers read-only, where
runc cannot make cgroups); ``bpf`` (runc's v2 device filter) and the ``@keyring`` calls
(runc's session keyring) let through nspawn's system call filter; ``/proc/sys/net``
writable (``SYSTEMD_NSPAWN_API_VFS_WRITABLE=network``, the node sets forwarding
sysctls); ``--register=no --keep-unit``, since no systemd on the outside can register a
machine or a scope.  nspawn puts the container in ``<its own cgroup>/payload``, so each
nspawn is first moved into a cgroup of its own (``cnmt-sd-<machine>`` in the unified and
the ``name=systemd`` hierarchies): two machines never share a cgroup tree, and teardown
finds every process of the machine there.

Commands run inside with ``nsenter -t <PID 1 of the machine> -a`` and a clean
environment.  Invariants: every kernel name starts with ``cnmt`` and is at most 15
characters; :meth:`SystemdHost.close` leaves no process (it kills what is left in the
machine's cgroups), no namespace, no cgroup, no mount and no file behind, and is
idempotent; every wait here is bounded.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Self

from lab.fabric import FABRIC_PREFIXLEN, Fabric
from lab.images import busybox_rootfs_tar
from lab.netns import Netns
from lab.paths import REPO, VENV_BIN
from lab.procs import (
    NAME_PREFIX,
    Cleanup,
    HarnessError,
    Managed,
    Process,
    descendants,
    is_alive,
    kill_until_gone,
    run_command,
    unique_name,
)

__all__ = [
    "PACKAGES",
    "ROOTFS_TAR",
    "SystemdHost",
    "build_wheels",
    "systemd_rootfs_tar",
]

_log = logging.getLogger(__name__)

CACHE_DIR = Path("/var/cache/calicnm")
ROOTFS_TAR = CACHE_DIR / "systemd-host-bookworm.tar"
"""The debootstrap rootfs every :class:`SystemdHost` starts from (built once, kept)."""
PACKAGES = (
    "systemd,systemd-sysv,dbus,docker.io,iptables,ipset,iproute2,bird2,python3,"
    "python3-venv,busybox-static,etcd-server,ca-certificates,make,kmod"
)
"""What the rootfs holds beyond minbase: Docker and what the node runs (``make deps``'
Debian packages), Python for the virtualenv, ``make`` for ``make install-systemd``."""
MIRROR = "http://deb.debian.org/debian"
MASKED_UNITS = (
    # Started by their Debian packages; the node runs its own etcd and BIRD, which
    # would find 127.0.0.1:2379 and BIRD's socket taken.
    "etcd.service",
    "bird.service",
    # Timers and a console getty: background noise in a test machine.
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "getty@tty1.service",
)
INNER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_CGROUP_ROOTS = (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup/systemd"))
_NSPAWN_ENV = {
    "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1",
    "SYSTEMD_NSPAWN_API_VFS_WRITABLE": "network",
}
_REBOOT_STATUS = 133
"""nspawn's exit status when the machine asked to be rebooted."""


# --------------------------------------------------------------------------------------------
# the rootfs and the wheels


def systemd_rootfs_tar(timeout: float = 1800) -> Path:
    """:data:`ROOTFS_TAR`, made with debootstrap (minbase + :data:`PACKAGES`) if missing.

    Holds an exclusive ``flock`` on a lock file beside it while checking and building, so
    parallel workers build it once.  The tarball appears atomically (written under a
    temporary name, then renamed); a failed build leaves nothing but the lock file and
    raises :class:`~lab.procs.CommandError` (or ``TimeoutExpired`` after ``timeout``).
    """
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with (CACHE_DIR / (ROOTFS_TAR.name + ".lock")).open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if ROOTFS_TAR.exists():
            return ROOTFS_TAR
        build = Path(tempfile.mkdtemp(prefix=f"{NAME_PREFIX}-sdroot-", dir=CACHE_DIR))
        partial = ROOTFS_TAR.with_suffix(".tar.partial")
        try:
            rootfs = build / "rootfs"
            run_command(
                [
                    "debootstrap",
                    "--variant=minbase",
                    f"--include={PACKAGES}",
                    "bookworm",
                    str(rootfs),
                    MIRROR,
                ],
                timeout=timeout,
            )
            run_command(["chroot", str(rootfs), "apt-get", "clean"], check=False)
            run_command(
                ["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(partial), "."],
                timeout=600,
            )
            os.replace(partial, ROOTFS_TAR)
        finally:
            partial.unlink(missing_ok=True)
            shutil.rmtree(build, ignore_errors=True)
        return ROOTFS_TAR


def build_wheels(dest: Path) -> None:
    """Wheels of this checkout's calicnm and its dependencies into ``dest``.

    The package is built from a copy of ``pyproject.toml``, ``README.md`` and
    ``calicnm/`` in a temporary directory, so the checkout is never written to.
    Dependencies come from pip's cache or PyPI.  Raises ``CommandError`` on failure.
    """
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"{NAME_PREFIX}-sdsrc-") as tmp:
        src = Path(tmp)
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(REPO / name, src / name)
        shutil.copytree(
            REPO / "calicnm", src / "calicnm", ignore=shutil.ignore_patterns("__pycache__")
        )
        run_command(
            [str(VENV_BIN / "python"), "-m", "pip", "wheel", "-q", "--wheel-dir", str(dest), tmp],
            timeout=900,
        )


# --------------------------------------------------------------------------------------------
# helpers


def _chroot(rootfs: Path, argv: Sequence[str], timeout: float = 300) -> str:
    """Run ``argv`` chrooted into ``rootfs`` with a clean environment; its stdout."""
    env = ["env", "-i", f"PATH={INNER_PATH}", "HOME=/root", "LANG=C.UTF-8"]
    return run_command(["chroot", str(rootfs), *env, *argv], timeout=timeout).stdout


def _ns_pids(pid: int) -> list[int]:
    """``pid``'s numbers in each PID namespace it is in, outermost first ([] if gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return [int(n) for n in line.split()[1:]]
    except (FileNotFoundError, ProcessLookupError):
        return []
    return []


def _cgroup_pids(cgroup_dirs: Sequence[Path]) -> set[int]:
    """Every pid in the given cgroup trees (missing trees count as empty)."""
    pids: set[int] = set()
    for top in cgroup_dirs:
        if not top.exists():
            continue
        for procs in top.rglob("cgroup.procs"):
            with contextlib.suppress(OSError):
                pids.update(int(p) for p in procs.read_text().split())
    return pids


def _remove_cgroup_tree(top: Path) -> None:
    """``rmdir`` a cgroup tree, deepest first; raises ``OSError`` if one stays busy."""
    if not top.exists():
        return
    dirs = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
    for d in [*dirs, top]:
        for attempt in range(20):
            try:
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                if attempt == 19:
                    raise
                time.sleep(0.25)


def _mounts_under(path: Path) -> list[str]:
    """Mount points of this mount namespace at or below ``path``, deepest first."""
    prefix = str(path)
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4]
        if point == prefix or point.startswith(prefix + "/"):
            points.append(point)
    return sorted(points, key=len, reverse=True)


# --------------------------------------------------------------------------------------------
# the machine


class SystemdHost(Managed):
    """One booted machine: systemd as PID 1, Docker and the calicnm node as its services.

    :meth:`create` prepares the rootfs (see the module docstring), then boots it and waits
    until systemd has finished starting up; on any failure it undoes everything (as
    :meth:`close`) and re-raises.  :meth:`run` executes a command inside.  :meth:`reboot`
    and :meth:`close` are bounded; :meth:`close` is idempotent, runs every step and raises
    :class:`~lab.procs.TeardownError` at the end if a step failed and ``raise_errors``.

    Invariants: while booted, :attr:`netns` exists and holds :attr:`address` on ``eth0``
    (the fabric), :attr:`leader` is the machine's PID 1 as seen from outside, and every
    process of the machine is in the ``cnmt-sd-<machine>`` cgroups.
    """

    def __init__(
        self,
        fabric: Fabric,
        workdir: Path,
        hostname: str = "sdhost",
        address_cidr: str | None = None,
        settings: dict[str, str] | None = None,
    ) -> None:
        self.fabric = fabric
        self.workdir = workdir
        self.rootfs = workdir / "rootfs"
        self.hostname = hostname
        self.cidr = address_cidr or fabric.next_address()
        if not self.cidr.endswith(f"/{FABRIC_PREFIXLEN}"):
            raise ValueError(f"{self.cidr!r}: want a fabric address with /{FABRIC_PREFIXLEN}")
        self.address = self.cidr.split("/")[0]
        self.settings = dict(settings or {})
        """Extra ``NAME=value`` lines for ``/etc/calicnm/calicnm.env``."""
        self.machine = unique_name(NAME_PREFIX + "sd")
        self.cgroups = [root / f"{NAME_PREFIX}-sd-{self.machine}" for root in _CGROUP_ROOTS]
        self.netns: Netns | None = None
        self.nspawn: Process | None = None
        self.leader = 0
        self.boots = 0

    def __repr__(self) -> str:
        return f"SystemdHost({self.machine!r}, {self.address})"

    # -- setup ------------------------------------------------------------------------------

    def create(self, boot_timeout: float = 240) -> Self:
        """Prepare the rootfs, boot, wait for startup to finish (``boot_timeout`` s)."""
        try:
            self.prepare()
            self.boot(boot_timeout)
        except BaseException:
            self.close(raise_errors=False)
            raise
        return self

    def prepare(self) -> None:
        """Extract the rootfs and install calicnm as the README says, all offline.

        Steps: wheels into ``/root/wheels``; ``python3 -m venv /opt/calicnm`` and ``pip
        install --no-index calicnm``; ``/usr/local/bin/calicnm``; the repository's
        ``Makefile`` and ``packaging/`` in ``/root/calicnm`` and ``make install-systemd``
        there; the settings (:attr:`address`, :attr:`hostname`, :attr:`settings`)
        appended to the installed ``calicnm.env``; the busybox image tarball in
        ``/root/busybox.tar``; :data:`MASKED_UNITS` masked; ``systemctl enable calicnm
        docker``.  Raises ``CommandError`` if a step fails.
        """
        tar = systemd_rootfs_tar()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.rootfs.mkdir()
        run_command(
            ["tar", "--numeric-owner", "-C", str(self.rootfs), "-xf", str(tar)], timeout=600
        )
        root = self.rootfs / "root"
        build_wheels(root / "wheels")
        _chroot(self.rootfs, ["python3", "-m", "venv", "/opt/calicnm"])
        _chroot(
            self.rootfs,
            ["/opt/calicnm/bin/pip", "install", "-q", "--no-index", "--find-links",
             "/root/wheels", "calicnm"],
        )  # fmt: skip
        _chroot(self.rootfs, ["ln", "-sf", "/opt/calicnm/bin/calicnm", "/usr/local/bin/calicnm"])
        src = root / "calicnm"
        src.mkdir()
        shutil.copy2(REPO / "Makefile", src / "Makefile")
        shutil.copytree(REPO / "packaging", src / "packaging")
        _chroot(self.rootfs, ["make", "-C", "/root/calicnm", "install-systemd"])
        lines = {
            "CALICNM_HOSTNAME": self.hostname,
            "CALICNM_IP": self.address,
            **self.settings,
        }
        with (self.rootfs / "etc/calicnm/calicnm.env").open("a") as env:
            env.write("".join(f"{k}={v}\n" for k, v in lines.items()))
        shutil.copy2(busybox_rootfs_tar(), root / "busybox.tar")
        (self.rootfs / "etc/hostname").write_text(self.hostname + "\n")
        _chroot(self.rootfs, ["systemctl", "mask", *MASKED_UNITS])
        _chroot(self.rootfs, ["systemctl", "enable", "calicnm", "docker"])

    def _new_netns(self) -> Netns:
        netns = Netns(unique_name(NAME_PREFIX + "sn")).create()
        try:
            self.fabric.attach(netns, self.cidr)
        except BaseException:
            netns.delete(raise_errors=False)
            raise
        return netns

    def boot(self, timeout: float = 240) -> None:
        """Start the machine on a fresh namespace; wait until systemd finished starting.

        "Finished" is ``systemctl is-system-running`` answering ``running`` or
        ``degraded``.  Raises :class:`HarnessError` (with the tail of nspawn's log) if
        nspawn exits or startup does not finish within ``timeout`` seconds; the machine is
        then left for :meth:`close`.
        """
        if self.nspawn is not None and self.nspawn.is_running():
            raise HarnessError(f"{self}: already booted")
        for cg in self.cgroups:
            cg.mkdir(exist_ok=True)
        self.netns = self._new_netns()
        self.boots += 1
        join = " && ".join(f'echo $$ > "{cg}/cgroup.procs"' for cg in self.cgroups)
        argv = [
            "sh",
            "-c",
            f'{join} && exec "$@"',
            "sh",
            "systemd-nspawn",
            "--quiet",
            f"--directory={self.rootfs}",
            f"--machine={self.machine}",
            "--boot",
            "--register=no",
            "--keep-unit",
            f"--network-namespace-path={self.netns.path}",
            "--capability=all",
            "--system-call-filter=@keyring bpf",
            "--console=pipe",
        ]
        self.nspawn = Process(
            argv,
            self.workdir / f"nspawn-{self.boots}.log",
            env={**os.environ, **_NSPAWN_ENV},
            name=f"nspawn {self.machine}",
        ).start()
        self.leader = self._find_leader(60)
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            if not self.nspawn.is_running():
                break
            out = self.run(["systemctl", "is-system-running"], check=False, timeout=30)
            state = out.stdout.strip()
            if state in ("running", "degraded"):
                return
            time.sleep(1)
        raise HarnessError(
            f"{self}: startup did not finish in {timeout:.0f}s (state {state!r}, nspawn "
            f"{'running' if self.nspawn.is_running() else 'exited'}):\n"
            f"{self.nspawn.log_tail(40)}"
        )

    def _find_leader(self, timeout: float) -> int:
        """The outside pid of the machine's PID 1 (a descendant of nspawn, pid 1 inside)."""
        assert self.nspawn is not None
        depth = len(_ns_pids(os.getpid())) + 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.nspawn.is_running():
            for pid in sorted(descendants([self.nspawn.pid]) - {self.nspawn.pid}):
                nspids = _ns_pids(pid)
                if len(nspids) == depth and nspids[-1] == 1:
                    return pid
            time.sleep(0.2)
        raise HarnessError(f"{self}: no PID 1 appeared:\n{self.nspawn.log_tail(40)}")

    # -- use --------------------------------------------------------------------------------

    def run(
        self,
        argv: Sequence[str],
        check: bool = True,
        timeout: float = 60,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the machine (all its namespaces, a clean environment).

        Raises ``CommandError`` on a non-zero exit if ``check``; ``TimeoutExpired`` after
        ``timeout`` (the command is killed).
        """
        if not self.leader or not is_alive(self.leader):
            raise HarnessError(f"{self}: not booted")
        env = ["env", "-i", f"PATH={INNER_PATH}", "HOME=/root", "LANG=C.UTF-8"]
        return run_command(
            ["nsenter", "-t", str(self.leader), "-a", "--", *env, *argv],
            check=check,
            timeout=timeout,
            input=input,
        )

    def unit(self, name: str, *props: str) -> dict[str, str]:
        """``systemctl show -p P ...`` of a unit as a dict."""
        args = [a for p in props for a in ("-p", p)]
        out = self.run(["systemctl", "show", *args, name]).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str, lines: int = 60) -> str:
        """The last ``lines`` of a unit's journal, this boot and earlier (for messages)."""
        out = self.run(
            ["journalctl", "--no-pager", "-q", "-n", str(lines), "-u", unit],
            check=False,
            timeout=30,
        )
        return out.stdout + out.stderr

    # -- shutdown ---------------------------------------------------------------------------

    def reboot(self, timeout: float = 240) -> None:
        """``systemctl reboot`` inside; wait for the machine to go down; boot it again.

        The network namespace is replaced by a fresh one between the two boots.  Raises
        :class:`HarnessError` if nspawn does not exit with status 133 within ``timeout``.
        """
        assert self.nspawn is not None
        self.run(["systemctl", "reboot"], check=False, timeout=30)
        try:
            status = self.nspawn.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise HarnessError(f"{self}: still up {timeout:.0f}s after 'systemctl reboot'") from exc
        if status != _REBOOT_STATUS:
            raise HarnessError(
                f"{self}: nspawn exited {status} on reboot, want {_REBOOT_STATUS}:\n"
                f"{self.nspawn.log_tail(40)}"
            )
        self._halt()
        self.boot(timeout)

    def _halt(self, timeout: float = 120) -> None:
        """Power the machine off (nspawn's SIGTERM), then make sure nothing of it is left.

        Waits ``timeout`` s for a clean poweroff, then SIGKILLs nspawn and every process in
        the machine's cgroups; deletes the namespace.  Raises on what could not be undone.
        """
        cleanup = Cleanup(f"machine {self.machine}")
        nspawn = self.nspawn
        if nspawn is not None:

            def poweroff() -> None:
                if nspawn.is_running():
                    nspawn.send_signal(signal.SIGTERM)  # nspawn: halt the machine
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        nspawn.wait(timeout)
                nspawn.stop(signal.SIGKILL)

            cleanup.step("poweroff", poweroff)
        cleanup.step(
            "killing the machine's processes",
            lambda: kill_until_gone(lambda: _cgroup_pids(self.cgroups), f"machine {self.machine}"),
        )
        self.leader = 0
        netns = self.netns
        if netns is not None:
            cleanup.step("deleting the namespace", netns.delete)
            self.netns = None
        cleanup.finish(raise_errors=True)

    def close(self, raise_errors: bool = True) -> None:
        """Power off and remove everything: processes, namespace, cgroups, mounts, files."""
        cleanup = Cleanup(f"machine {self.machine}")
        cleanup.step("halting", self._halt)
        for cg in self.cgroups:
            cleanup.step(f"removing cgroup {cg}", functools.partial(_remove_cgroup_tree, cg))
        cleanup.step(
            "nspawn's propagation directory",
            lambda: _rmdir_if_present(Path("/run/systemd/nspawn/propagate") / self.machine),
        )

        def unmount_and_remove() -> None:
            for point in _mounts_under(self.workdir):
                run_command(["umount", "-l", point], check=False)
            left = _mounts_under(self.workdir)
            if left:
                raise HarnessError(f"mounts left under {self.workdir}: {left}")
            if self.rootfs.exists():
                shutil.rmtree(self.rootfs)

        cleanup.step("removing the rootfs", unmount_and_remove)
        cleanup.finish(raise_errors)

    _open = create
    _close = close


def _rmdir_if_present(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.rmdir()
