"""The node image and the managed plugin in the lab: built once from the repository's
own scripts, then loaded into emulated hosts whose node runs as a container.

:func:`build_node_image` runs ``scripts/build-image.sh`` and ``scripts/build-plugin.sh``
against a throwaway dockerd (in its own namespace, like every lab daemon) and keeps the
image as a ``docker save`` tarball plus the plugin directory, so each emulated host can
``docker load`` it: every lab dockerd has its own data root.  The build's debootstrap runs
in the root namespace and reaches Debian's mirror; nothing inside the build touches the
network.

:class:`ContainerNodeHost` is a :class:`~lab.cluster.CalicnmHost` whose node is started
the way README's walkthrough starts it: settings in a file, then ``calicnm node run
--container``.  Each host has its own settings file (several emulated hosts share this
machine's ``/etc``), named by ``CALICNM_CONFIG_FILE`` for the node command and for every
CLI call made through :meth:`~lab.cluster.CalicnmHost.calicnm`.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from lab.cluster import CalicnmHost, wait_until
from lab.dockerd import DOCKER_CLIENT, DockerHost
from lab.fabric import Fabric
from lab.netns import Netns
from lab.paths import REPO
from lab.procs import Cleanup, HarnessError

__all__ = [
    "NODE_CONTAINER",
    "NODE_IMAGE",
    "PLUGIN",
    "PLUGIN_DRIVER",
    "ContainerNodeHost",
    "ManagedPluginHost",
    "NodeBuild",
    "build_node_image",
    "managed_socket",
]

NODE_IMAGE = "calicnm/node:latest"
NODE_CONTAINER = "calicnm-node"


@dataclass(frozen=True)
class NodeBuild:
    image_tar: Path
    """``docker save`` of :data:`NODE_IMAGE`."""
    plugin_dir: Path
    """``config.json`` and ``rootfs/``, ready for ``docker plugin create``."""


def _run_script(script: str, args: list[str], docker: DockerHost, log: Path) -> None:
    env = docker.client_env()
    env.update(
        DOCKER=f"{DOCKER_CLIENT} -H unix://{docker.sock}",
        PYTHON=str(REPO / ".venv" / "bin" / "python"),
        IMAGE=NODE_IMAGE,
    )
    with open(log, "a") as out:
        proc = subprocess.run(
            ["sh", str(REPO / "scripts" / script), *args],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=900,
        )
    if proc.returncode != 0:
        raise HarnessError(f"{script} failed ({proc.returncode}):\n{log.read_text()[-3000:]}")


def build_node_image(workdir: Path) -> NodeBuild:
    """Build the node image and the plugin directory under ``workdir`` (bounded: 15 min
    per script).  HarnessError with the build's log tail on failure; the build daemon is
    gone either way."""
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "build.log"
    with Fabric() as fabric:
        att = fabric.add_host()
        with DockerHost(att.host, workdir / "builder") as builder:
            _run_script("build-image.sh", [NODE_IMAGE], builder, log)
            tar = workdir / "node-image.tar"
            builder.docker("save", "-o", str(tar), NODE_IMAGE, timeout=300)
            plugin = workdir / "plugin"
            _run_script("build-plugin.sh", [str(plugin)], builder, log)
    return NodeBuild(tar, plugin)


class _DockerStartedHost(CalicnmHost):
    """A host whose node Docker runs (a container or a managed plugin): dockerd starts
    first, then :meth:`prepare_node` and :meth:`start_node`.  :meth:`start` either fully
    succeeds or undoes what it did.  :meth:`close` removes the workload containers first
    (their plugin calls need the node), then the node (:meth:`stop_node`), then stops
    dockerd."""

    def __init__(
        self,
        netns: Netns,
        address: str,
        workdir: Path,
        hostname: str,
        etcd_endpoints: str,
        *,
        build: NodeBuild,
    ) -> None:
        super().__init__(netns, address, workdir, hostname, etcd_endpoints)
        self.build = build

    def prepare_node(self) -> None:
        """What the node needs on this host before :meth:`start_node`."""

    def start(self) -> Self:
        try:
            self.dockerd.start()
            self.prepare_node()
            self.dockerd.import_busybox()
            self.start_node()
        except BaseException:
            self.close(raise_errors=False)
            raise
        return self

    def remove_workloads(self) -> None:
        """``docker rm -f`` every container but the node's."""
        rows = self.docker("ps", "-a", "--format", "{{.ID}} {{.Names}}").splitlines()
        others = [row.split()[0] for row in rows if row.split()[1:] != [NODE_CONTAINER]]
        if others:
            self.docker("rm", "-f", *others, timeout=120)

    def close(self, raise_errors: bool = True) -> None:
        cleanup = Cleanup(f"host {self.hostname}")
        if self.dockerd.is_running():
            cleanup.step("removing workload containers", self.remove_workloads)
            cleanup.step("removing the node", self.stop_node)
        cleanup.step("stopping dockerd", self.dockerd.stop)
        cleanup.finish(raise_errors)

    _open = start
    _close = close


class ContainerNodeHost(_DockerStartedHost):
    """An emulated host whose node is the node image, run by ``calicnm node run
    --container`` on the host's own dockerd (started first, as on a booted host).

    The settings file is written, and the image loaded, once dockerd runs."""

    @property
    def config_file(self) -> Path:
        return self.workdir / "calicnm.env"

    def env(self) -> dict[str, str]:
        """The CLI's environment: only the settings file, as an operator's shell has."""
        settings = super().env()
        env = {k: v for k, v in settings.items() if not k.startswith(("CALICNM_", "ETCD_"))}
        env.pop("DOCKER_HOST", None)
        env["CALICNM_CONFIG_FILE"] = str(self.config_file)
        return env

    def write_config(self) -> None:
        """The host's ``calicnm.env``: what the walkthrough writes, plus the lab's own
        paths (state dir, plugin dir and Docker socket of this emulated host)."""
        settings = super().env()
        settings["CALICNM_IP"] = self.address
        lines = [
            f"{key}={value}"
            for key, value in sorted(settings.items())
            if key.startswith(("CALICNM_", "ETCD_")) or key == "DOCKER_HOST"
        ]
        self.config_file.parent.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text("\n".join(lines) + "\n")

    def start_node(self) -> None:
        self.calicnm("node", "run", "--container")
        wait_until(self.answering, 30, "plugin socket")

    def stop_node(self, sig: int = 15) -> int | None:
        """Remove the node container (``docker rm -f``), as an operator would."""
        if self.dockerd.is_running():
            self.dockerd.docker("rm", "-f", NODE_CONTAINER, check=False, timeout=90)
        return None

    def prepare_node(self) -> None:
        self.write_config()
        self.dockerd.docker("load", "-i", str(self.build.image_tar), timeout=300)


def managed_socket(docker: DockerHost) -> Path | None:
    """The socket of the managed plugin enabled on ``docker``, or None while there is
    none.  Docker 20.10 keeps it in ``/run/docker/plugins/<plugin id>/`` whatever its
    exec root, which in the lab daemon's mount namespace is ``plugins_dir``.
    HarnessError if there are several."""
    found = sorted(docker.plugins_dir.glob("*/calicnm.sock"))
    if len(found) > 1:
        raise HarnessError(f"expected one managed plugin socket, found {found}")
    return found[0] if found else None


PLUGIN = "calicnm/calicnm"
PLUGIN_DRIVER = f"{PLUGIN}:latest"
"""The driver name networks give: Docker 20.10 finds a managed network or IPAM
driver only by its full name, tag included."""


class ManagedPluginHost(_DockerStartedHost):
    """An emulated host running calicnm as the managed plugin, created, set and enabled
    as README's "The managed plugin" says, with the mount sources set to this host's
    directories (the lab's dockerd socket is not at ``/var/run/docker.sock``).

    Stopping the node disables and removes the plugin."""

    _created = False

    @property
    def config_dir(self) -> Path:
        return self.workdir / "etc-calicnm"

    @property
    def socket(self) -> Path:
        """The managed plugin's socket; before it exists, a path that never will."""
        found = managed_socket(self.dockerd)
        return found or self.dockerd.plugins_dir / "not-enabled" / "calicnm.sock"

    def create_network(self, name: str, *args: str, check: bool = True) -> str:
        result = self.dockerd.docker(
            "network",
            "create",
            "-d",
            PLUGIN_DRIVER,
            "--ipam-driver",
            PLUGIN_DRIVER,
            *args,
            name,
            check=check,
        )
        return (result.stdout if result.returncode == 0 else result.stderr).strip()

    def start_node(self) -> None:
        """``docker plugin create``, ``set`` and ``enable``; wait for the socket."""
        for path in (self.state_dir, self.config_dir):
            path.mkdir(parents=True, exist_ok=True)
        self.dockerd.docker("plugin", "create", PLUGIN, str(self.build.plugin_dir), timeout=300)
        self._created = True
        settings = {
            k: v
            for k, v in super().env().items()
            if k.startswith("CALICNM_") and k not in ("CALICNM_SOCKET", "CALICNM_STATE_DIR")
        }
        self.dockerd.docker(
            "plugin",
            "set",
            PLUGIN,
            f"ETCD_ENDPOINTS={self.etcd_endpoints}",
            f"CALICNM_IP={self.address}",
            *(f"{k}={v}" for k, v in sorted(settings.items()) if k in _PLUGIN_SETTABLE),
            f"state.source={self.state_dir}",
            f"docker-sock.source={self.dockerd.sock}",
            f"config.source={self.config_dir}",
        )
        self.dockerd.docker("plugin", "enable", PLUGIN, timeout=120)
        wait_until(self.answering, 60, "managed plugin socket")

    def stop_node(self, sig: int = 15) -> int | None:
        """``docker plugin disable -f`` and ``docker plugin rm``."""
        if self._created and self.dockerd.is_running():
            self.dockerd.docker("plugin", "disable", "-f", PLUGIN, check=False, timeout=90)
            self.dockerd.docker("plugin", "rm", "-f", PLUGIN, timeout=90)
            self._created = False
        return None


_PLUGIN_SETTABLE = ("CALICNM_HOSTNAME", "CALICNM_LOG_LEVEL")
"""Of the lab's node settings, those plugin.json lets ``docker plugin set`` change.
The lab's short intervals are not among them: the managed node keeps the defaults."""
