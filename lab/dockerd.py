"""``DockerHost``: a dockerd inside a network namespace, an emulated Docker host.

It runs in a private mount namespace under a subreaper (``cnmt-reaper.py``), so that
stopping it leaves no process, mount, cgroup or directory behind; see :class:`DockerHost`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Self

from lab.images import DEFAULT_IMAGE, IMAGE_PATH_ENV, busybox_rootfs_tar
from lab.netns import Netns
from lab.procs import (
    NAME_PREFIX,
    Cleanup,
    CommandError,
    HarnessError,
    Managed,
    Process,
    cmdline,
    descendants,
    is_alive,
    kill_until_gone,
    run_command,
)

__all__ = ["DOCKER_CLIENT", "DockerHost"]

_log = logging.getLogger(__name__)

DOCKER_CLIENT = "/usr/bin/docker"
"""The Debian 20.10 client; newer clients refuse to talk to the 20.10 daemon."""
DOCKERD = "dockerd"
_HOST_PLUGIN_DIR = Path("/run/docker/plugins")
_HOST_CONTAINERD_RUN = Path("/run/containerd")
_SUN_PATH_MAX = 107


def _rmtree(path: Path) -> None:
    """Remove ``path`` recursively if it exists; raise if anything is left."""
    if path.exists() or path.is_symlink():
        shutil.rmtree(path)


# Runs as the parent of dockerd (inside its namespaces).  It is a child subreaper, so the
# containerd shims (which double-fork) and any container process orphaned by a dead shim are
# re-parented to it instead of to PID 1.  It forwards SIGTERM/SIGINT/SIGHUP/SIGQUIT to
# dockerd; once dockerd has exited it SIGKILLs and reaps every remaining child (bounded,
# 10 s), then exits with dockerd's status (128+N if dockerd died of signal N).  Thus when it
# exits, everything dockerd started is dead *and reaped*: no zombies are left for PID 1.
_REAPER = r"""
import ctypes, os, signal, sys, time
if ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
    sys.exit("cnmt-reaper: prctl(PR_SET_CHILD_SUBREAPER) failed")
child = os.fork()
if child == 0:
    try:
        os.execvp(sys.argv[1], sys.argv[1:])
    except OSError as exc:
        print(f"cnmt-reaper: cannot exec {sys.argv[1]}: {exc}", file=sys.stderr, flush=True)
    os._exit(127)
def forward(signum, _frame):
    try:
        os.kill(child, signum)
    except ProcessLookupError:
        pass
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
    signal.signal(s, forward)
code = 1
while True:
    try:
        pid, status = os.wait()
    except ChildProcessError:
        break
    if pid == child:
        code = os.waitstatus_to_exitcode(status)
        break
signal.signal(signal.SIGTERM, signal.SIG_DFL)
me = str(os.getpid())
deadline = time.monotonic() + 10
while time.monotonic() < deadline:
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        break
    for p in os.listdir("/proc"):
        try:
            with open(f"/proc/{p}/stat") as f:
                st = f.read()
        except (OSError, ValueError):
            continue
        fields = st[st.rindex(")") + 2:].split()
        if fields[1] == me and fields[0] not in "ZX":
            print(f"cnmt-reaper: SIGKILL leftover pid {p}", file=sys.stderr, flush=True)
            try:
                os.kill(int(p), signal.SIGKILL)
            except ProcessLookupError:
                pass
    time.sleep(0.05)
sys.exit(code if code >= 0 else 128 - code)
"""


class DockerHost(Managed):
    """A dockerd running inside ``netns``: an emulated Docker host.

    Layout: a short private runtime dir ``/tmp/cnmt-*`` (unix socket paths must stay under
    108 bytes) holds the API socket ``sock``, ``exec-root``, the pidfile, the trust key,
    ``daemon.json``, the docker client config, the reaper script, and ``plugins_dir``.
    ``workdir`` (a temp dir if not given) holds ``dockerd.log`` and ``data-root``.  The
    process is the reaper, so ``process.pid`` is not dockerd's pid (that is in ``pidfile``).

    dockerd runs as ``nsenter --net=<netns> unshare -m --propagation private sh -c
    'mount --bind ...; exec python cnmt-reaper.py dockerd ...'``, where the reaper (see
    ``_REAPER``) is a child subreaper that makes sure everything dockerd started dies and is
    reaped when dockerd exits.  In the private mount namespace ``plugins_dir`` is
    bind-mounted on ``/run/docker/plugins`` (so it discovers exactly this host's plugins
    while host-namespace processes serve ``plugins_dir/<name>.sock``) and a private dir on
    ``/run/containerd`` (shim sockets).  Containers get the cgroup parent ``cgroup_parent``
    so they can be found and removed even if the daemon is gone.

    :meth:`stop` (idempotent, never stops early on errors): ``docker rm -f`` all containers
    if the daemon answers, SIGTERM dockerd (SIGKILL after 20 s), SIGKILL every leftover
    process of this daemon (containerd, shims, their descendants, anything in the container
    cgroups), remove the cgroups, the runtime dir, the data root, and the workdir if it was a
    temp dir (a caller-given workdir keeps ``dockerd.log``).  Other processes in ``netns``
    (e.g. the plugin under test) are not touched; deleting the netns kills them.  To keep a
    plugin alive for the whole daemon lifetime, :meth:`prepare` first, start the plugin on
    ``plugins_dir / "<driver>.sock"``, then :meth:`start`, and stop in reverse order.

    By default dockerd runs with ``--bridge=none``; ``default_bridge=True`` gives it its
    default bridge ``docker0`` (and dockerd's own iptables rules for it), as on a stock
    Docker host.  :meth:`stop_daemon` and :meth:`start_daemon` stop and start the same
    daemon again (data root and runtime dir kept), as a ``systemctl restart docker`` would.
    """

    def __init__(
        self,
        netns: Netns,
        workdir: str | os.PathLike[str] | None = None,
        *,
        extra_args: Sequence[str] = (),
        default_bridge: bool = False,
    ) -> None:
        self.netns = netns
        self.extra_args = list(extra_args)
        self.default_bridge = default_bridge
        self._owns_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else None
        self.runtime_dir: Path | None = None
        self.cgroup_parent = f"/{NAME_PREFIX}-docker-{netns.name}"
        self.process: Process | None = None
        self._images: set[str] = set()
        self._stopped = False

    def __repr__(self) -> str:
        return f"DockerHost({self.netns.name!r}, runtime_dir={self.runtime_dir})"

    # paths ---------------------------------------------------------------------------------

    def _rt(self) -> Path:
        if self.runtime_dir is None:
            raise HarnessError("DockerHost not started")
        return self.runtime_dir

    def _wd(self) -> Path:
        if self.workdir is None:
            raise HarnessError("DockerHost not started")
        return self.workdir

    @property
    def sock(self) -> Path:
        """The daemon's API socket (in the host mount namespace)."""
        return self._rt() / "docker.sock"

    @property
    def plugins_dir(self) -> Path:
        """Host-visible directory that this dockerd sees as ``/run/docker/plugins``."""
        return self._rt() / "plugins"

    @property
    def exec_root(self) -> Path:
        return self._rt() / "exec-root"

    @property
    def data_root(self) -> Path:
        return self._wd() / "data-root"

    @property
    def log_path(self) -> Path:
        return self._wd() / "dockerd.log"

    @property
    def pidfile(self) -> Path:
        return self._rt() / "dockerd.pid"

    # lifecycle -----------------------------------------------------------------------------

    def _dockerd_argv(self) -> list[str]:
        rt = self._rt()
        dockerd = [
            DOCKERD,
            "--data-root",
            str(self.data_root),
            "--exec-root",
            str(self.exec_root),
            "-H",
            f"unix://{self.sock}",
            "--pidfile",
            str(self.pidfile),
            *(() if self.default_bridge else ("--bridge=none",)),
            "--config-file",
            str(rt / "daemon.json"),
            "--cgroup-parent",
            self.cgroup_parent,
            *self.extra_args,
        ]
        script = (
            'set -e; mount --bind "$1" /run/docker/plugins; '
            'mount --bind "$2" /run/containerd; shift 2; exec "$@"'
        )
        return [
            "unshare",
            "-m",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            script,
            "sh",
            str(self.plugins_dir),
            str(rt / "containerd-run"),
            sys.executable,
            "-I",
            str(rt / "cnmt-reaper.py"),
            *dockerd,
        ]

    def prepare(self) -> Self:
        """Create the runtime dir, workdir and ``plugins_dir`` without starting dockerd.

        Lets a plugin be started (listening in ``plugins_dir``) before the daemon, so that
        with ``contextlib.ExitStack`` it can also be stopped after it.  Idempotent; called by
        :meth:`start`.  On failure whatever it created is removed again.
        """
        if self.runtime_dir is not None:
            return self
        if self._stopped:
            raise HarnessError("DockerHost already stopped; make a new one")
        try:
            self.runtime_dir = Path(tempfile.mkdtemp(prefix=f"{NAME_PREFIX}-", dir="/tmp"))
            if self.workdir is None:
                self.workdir = Path(tempfile.mkdtemp(prefix=f"{NAME_PREFIX}-dh-"))
            self.workdir.mkdir(parents=True, exist_ok=True)
            longest = self.exec_root / "containerd" / "containerd.sock.ttrpc"
            if len(str(longest)) > _SUN_PATH_MAX:
                raise HarnessError(f"runtime dir path too long for unix sockets: {longest}")
            for d in (self.plugins_dir, self._rt() / "containerd-run", self._rt() / "client"):
                d.mkdir(mode=0o700)
            self.plugins_dir.chmod(0o755)
            # The trust key would otherwise be written to /etc/docker/key.json; its only
            # knob in 20.10 is this config-file key (no CLI flag).
            config = {"deprecated-key-path": str(self._rt() / "key.json")}
            (self._rt() / "daemon.json").write_text(json.dumps(config) + "\n")
            (self._rt() / "cnmt-reaper.py").write_text(_REAPER)
            for mountpoint in (_HOST_PLUGIN_DIR, _HOST_CONTAINERD_RUN):
                mountpoint.mkdir(parents=True, exist_ok=True)
        except BaseException:
            self.stop(raise_errors=False)
            raise
        return self

    def start(self, timeout: float = 60) -> Self:
        """Start dockerd and wait until ``docker info`` answers (bounded by ``timeout``).

        On any failure everything done so far is undone (as by :meth:`stop`) and the error is
        raised; a daemon that exits or never answers gives :class:`HarnessError` with the tail
        of ``dockerd.log``.
        """
        if self.process is not None:
            raise HarnessError("DockerHost already started")
        if not self.netns.exists():
            raise HarnessError(f"{self.netns} does not exist")
        self.prepare()
        try:
            self.process = Process(
                self._dockerd_argv(),
                self.log_path,
                netns=self.netns,
                name=f"dockerd[{self.netns.name}]",
            ).start()
            self._wait_ready(timeout)
        except BaseException as exc:
            tail = self.process.log_tail(40) if self.process else ""
            self.stop(raise_errors=False)
            if isinstance(exc, Exception) and not isinstance(exc, HarnessError):
                raise HarnessError(
                    f"dockerd in {self.netns} failed to start: {exc}\n"
                    f"--- dockerd.log tail ---\n{tail}"
                ) from exc
            raise
        return self

    def stop_daemon(self, timeout: float = 20, sig: int = signal.SIGTERM) -> None:
        """Stop dockerd (``sig``, SIGKILL after ``timeout``) and kill whatever it left running,
        keeping the runtime dir and data root, so :meth:`start_daemon` brings the same host
        back (containers with a restart policy start again).  With ``sig=SIGKILL`` dockerd
        dies as in a power loss: no plugin call is made for its containers, which die with it.
        :meth:`stop` still tears everything down afterwards, whether or not the daemon was
        started again."""
        if self.process is None:
            raise HarnessError("DockerHost not started")
        self.process.stop(sig, timeout=timeout)
        self.process = None
        kill_until_gone(self._leftover_pids, f"dockerd {self.netns.name} leftovers")
        # A killed dockerd leaves its own and containerd's pid files behind (as a
        # reboot clears /run, so does this): a reused pid would look alive.
        self.pidfile.unlink(missing_ok=True)
        (self.exec_root / "containerd" / "containerd.pid").unlink(missing_ok=True)

    def start_daemon(self, timeout: float = 60) -> None:
        """Start dockerd again after :meth:`stop_daemon`, with the same arguments and
        directories; wait until it answers (bounded by ``timeout``).  Raises
        :class:`HarnessError` if it does not; :meth:`stop` cleans up either way."""
        if self.process is not None:
            raise HarnessError("dockerd is running; stop_daemon first")
        if self._stopped or self.runtime_dir is None:
            raise HarnessError("DockerHost not started, or already stopped")
        self.process = Process(
            self._dockerd_argv(),
            self.log_path,
            netns=self.netns,
            name=f"dockerd[{self.netns.name}]",
        ).start()
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise HarnessError(
                    f"dockerd in {self.netns} exited with {self.process.returncode}\n"
                    f"--- dockerd.log tail ---\n{self.process.log_tail(40)}"
                )
            if self.sock.exists():
                try:
                    res = self.docker(
                        "info", "--format", "{{.ServerVersion}}", check=False, timeout=10
                    )
                except subprocess.TimeoutExpired:
                    last = "docker info timed out"
                else:
                    if res.returncode == 0:
                        _log.info(
                            "dockerd %s ready in %s (server %s)",
                            self.netns.name,
                            self.runtime_dir,
                            res.stdout.strip(),
                        )
                        return
                    last = res.stderr.strip()
            time.sleep(0.2)
        raise HarnessError(
            f"dockerd in {self.netns} not ready after {timeout}s ({last})\n"
            f"--- dockerd.log tail ---\n{self.process.log_tail(40)}"
        )

    def client_env(self) -> dict[str, str]:
        """Environment for the docker client: private config dir, no inherited DOCKER_*."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        env["DOCKER_CONFIG"] = str(self._rt() / "client")
        return env

    def docker(
        self, *args: str, check: bool = True, timeout: float = 120, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``/usr/bin/docker -H unix://<sock> *args`` in the host namespaces.

        Raises :class:`CommandError` on non-zero exit if ``check``; ``TimeoutExpired`` (client
        killed) after ``timeout``.
        """
        argv = [DOCKER_CLIENT, "-H", f"unix://{self.sock}", *args]
        return run_command(argv, check=check, timeout=timeout, input=input, env=self.client_env())

    def import_busybox(self, tag: str = DEFAULT_IMAGE) -> str:
        """Make sure image ``tag`` (busybox rootfs, ``PATH`` set) exists; return ``tag``."""
        if tag in self._images:
            return tag
        if self.docker("image", "inspect", tag, check=False, timeout=30).returncode != 0:
            tar_path = busybox_rootfs_tar()
            self.docker(
                "import",
                "-c",
                IMAGE_PATH_ENV,
                str(tar_path),
                tag,
                timeout=120,
            )
        self._images.add(tag)
        return tag

    def is_running(self) -> bool:
        return self.process is not None and self.process.is_running()

    # teardown ------------------------------------------------------------------------------

    def _cgroup_dirs(self) -> list[Path]:
        """Our cgroup-parent directory in every mounted cgroup hierarchy (existing only)."""
        out: list[Path] = []
        with open("/proc/self/mountinfo") as fh:
            for line in fh:
                left, _, right = line.partition(" - ")
                fstype = right.split()[0] if right else ""
                if fstype in ("cgroup", "cgroup2"):
                    d = Path(left.split()[4]) / self.cgroup_parent.lstrip("/")
                    if d.is_dir():
                        out.append(d)
        return out

    def _cgroup_pids(self) -> set[int]:
        pids: set[int] = set()
        for root in self._cgroup_dirs():
            for procs in root.rglob("cgroup.procs"):
                with contextlib.suppress(OSError):
                    pids.update(int(p) for p in procs.read_text().split())
        return pids

    def _leftover_pids(self) -> set[int]:
        """dockerd, containerd and shims of this daemon, container processes, descendants."""
        roots: set[int] = set()
        if self.process is not None and self.process.returncode is None:
            roots.add(self.process.pid)
        markers: list[str] = []
        if self.runtime_dir is not None:
            markers.append(str(self.exec_root))
        if self.workdir is not None:
            markers.append(str(self.data_root))
        for pid in self.netns.pids():
            if any(arg == m or arg.startswith(m + "/") for arg in cmdline(pid) for m in markers):
                roots.add(pid)
        roots |= self._cgroup_pids()
        return descendants(roots) if roots else set()

    def leftover_pids(self) -> list[int]:
        """Live processes that belong to this daemon (for assertions after :meth:`stop`)."""
        return sorted(p for p in self._leftover_pids() if is_alive(p))

    def _remove_cgroups(self) -> None:
        for root in self._cgroup_dirs():
            for _ in range(50):
                try:
                    for dirpath, _dirs, _files in os.walk(root, topdown=False):
                        os.rmdir(dirpath)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)
            if root.exists():
                raise HarnessError(f"cgroup {root} could not be removed")

    def _remove_containers(self) -> None:
        """``docker rm -f`` every container; a daemon that died meanwhile is not an error."""
        try:
            ids = self.docker("ps", "-aq", timeout=30).stdout.split()
        except (CommandError, subprocess.TimeoutExpired):
            time.sleep(0.2)
            if not self.is_running():
                _log.warning("dockerd %s died before teardown; skipping docker rm", self.netns.name)
                return
            raise
        if ids:
            self.docker("rm", "-f", *ids, timeout=90)

    def stop(self, raise_errors: bool = True) -> None:
        """Tear everything down (see the class docstring).  Idempotent and bounded."""
        if self._stopped:
            return
        if self.runtime_dir is None and self.workdir is None:
            self._stopped = True
            return
        self._stopped = True
        cleanup = Cleanup(f"dockerd {self.netns.name}")
        if self.is_running():
            cleanup.step("removing containers", self._remove_containers)
        if self.process is not None:
            proc = self.process
            cleanup.step("stopping dockerd", lambda: proc.stop(signal.SIGTERM, timeout=20))
        cleanup.step(
            "killing leftovers",
            lambda: kill_until_gone(self._leftover_pids, f"dockerd {self.netns.name} leftovers"),
        )
        cleanup.step("removing cgroups", self._remove_cgroups)
        if self.runtime_dir is not None:
            rt = self.runtime_dir
            cleanup.step("removing runtime dir", lambda: _rmtree(rt))
        if self.workdir is not None:
            wd = self.workdir
            if self._owns_workdir:
                cleanup.step("removing workdir", lambda: _rmtree(wd))
            else:
                cleanup.step("removing data root", lambda: _rmtree(wd / "data-root"))
        cleanup.finish(raise_errors)

    _open = start
    _close = stop
