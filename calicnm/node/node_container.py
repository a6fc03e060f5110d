"""The node as a container on its own host: ``calicnm node run --container``.

As ``calicoctl node run`` did for ``calico/node``, the CLI starts the node
image (``make image``) on the host's dockerd, in the host's network and UTS
namespaces, with what the node needs from the host mounted at the same
paths as on the host:

- the state directory (embedded etcd data, agent status, BIRD's socket), so
  ``calicnm status`` and ``diags`` on the host read the same files;
- the directory of the plugin socket, where dockerd finds the plugin;
- the Docker API socket, at ``/var/run/docker.sock`` inside;
- the iptables lock ``/run/xtables.lock``, shared with dockerd;
- the etcd TLS files named by the settings, read-only.

It gets ``NET_ADMIN`` and ``NET_RAW`` and a writable ``/proc/sys``
(``systempaths=unconfined``) rather than ``--privileged``: that is all the
node uses.  Settings that are not defaults travel as environment variables,
so the node in the container runs with exactly what ``calicnm config show``
prints on the host (flags, environment and settings file alike).  The
container restarts always: dockerd starts it again at boot, and the
containers on calicnm networks that dockerd restores wait for its socket.

:func:`node_container_spec` is pure (the request body of Docker's create
call); :func:`start_node_container` talks to Docker and waits for the
plugin to answer, raising :class:`NodeContainerError` with one line to show.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from calicnm.config import SETTINGS, Config
from calicnm.errors import CalicnmError
from calicnm.node.docker_api import UNREACHABLE, DockerAPI

DEFAULT_IMAGE = "calicnm/node:latest"
DEFAULT_NAME = "calicnm-node"
CONTAINER_STATE_DIR = "/var/lib/calicnm"
CONTAINER_DOCKER_SOCKET = "/var/run/docker.sock"
XTABLES_LOCK = "/run/xtables.lock"
CAPABILITIES = ("NET_ADMIN", "NET_RAW")
NODE_LABEL = "io.calicnm.node"

_MAPPED = ("state_dir", "socket", "docker_host")
"""Settings whose host paths become mounts rather than plain variables."""
_TLS_FILES = ("etcd_trusted_ca_file", "etcd_cert_file", "etcd_key_file")


class NodeContainerError(CalicnmError):
    """The node container could not be started; the message is one line."""


def node_container_spec(config: Config, sources: Mapping[str, str], image: str) -> dict[str, Any]:
    """Docker's ``/containers/create`` body for the node of ``config``.

    ``sources`` says which settings were given (anything but ``default``);
    only those are passed, plus the host name and the state directory, so
    the image's own defaults (its iptables backend) apply to the rest.
    """
    env = {
        SETTINGS[name].env: str(getattr(config, name))
        for name, source in sources.items()
        if source != "default" and name not in _MAPPED and getattr(config, name) is not None
    }
    env[SETTINGS["hostname"].env] = config.hostname
    env[SETTINGS["state_dir"].env] = config.state_dir
    env[SETTINGS["socket"].env] = config.socket
    binds = [
        f"{config.state_dir}:{config.state_dir}",
        f"{os.path.dirname(config.socket)}:{os.path.dirname(config.socket)}",
        f"{XTABLES_LOCK}:{XTABLES_LOCK}",
    ]
    docker = urlsplit(config.docker_host)
    if docker.scheme == "unix":
        binds.append(f"{docker.path}:{CONTAINER_DOCKER_SOCKET}")
        env[SETTINGS["docker_host"].env] = f"unix://{CONTAINER_DOCKER_SOCKET}"
    else:
        env[SETTINGS["docker_host"].env] = config.docker_host
    for name in _TLS_FILES:
        path = getattr(config, name)
        if path:
            binds.append(f"{path}:{path}:ro")
    return {
        "Image": image,
        "Cmd": ["node", "run"],
        "Env": [f"{key}={value}" for key, value in sorted(env.items())],
        "Labels": {NODE_LABEL: "true"},
        "HostConfig": {
            "NetworkMode": "host",
            "UTSMode": "host",
            "Init": True,
            "CapAdd": list(CAPABILITIES),
            # docker run --security-opt systempaths=unconfined: /proc/sys writable.
            "MaskedPaths": [],
            "ReadonlyPaths": [],
            "Binds": binds,
            "RestartPolicy": {"Name": "always"},
        },
    }


def start_node_container(
    config: Config,
    sources: Mapping[str, str],
    image: str = DEFAULT_IMAGE,
    name: str = DEFAULT_NAME,
    timeout: float = 90.0,
) -> str:
    """Start the node container and wait (at most ``timeout`` seconds) until
    its plugin answers on ``config.socket``; the container's id.

    A running container of that name is an error (the operator removes it
    first, as with ``calicoctl node run``); a stopped one is replaced.  A
    node that exits or never answers is an error, and the container is left
    for ``docker logs``."""
    api = DockerAPI(config.docker_host, timeout=60.0)
    try:
        running = api.container_running(name)
        if running:
            raise NodeContainerError(
                f"container {name} is already running; remove it first (docker rm -f {name})"
            )
        if not api.has_image(image):
            raise NodeContainerError(
                f"image {image} is not on this Docker; build it with 'make image'"
            )
        for path in (config.state_dir, os.path.dirname(config.socket)):
            os.makedirs(path, exist_ok=True)
        if not os.path.exists(XTABLES_LOCK):
            # Docker would make a missing bind source a directory.
            open(XTABLES_LOCK, "a").close()
        if running is False:
            api.remove_container(name)
        container_id = api.run_container(name, node_container_spec(config, sources, image))
        deadline = time.monotonic() + timeout
        while not _answers(config.socket):
            if time.monotonic() > deadline:
                raise NodeContainerError(
                    f"the node in container {name} did not answer on {config.socket} within "
                    f"{timeout:.0f} s; see docker logs {name}"
                )
            if api.container_running(name) is False:
                raise NodeContainerError(
                    f"the node in container {name} exited; see docker logs {name}"
                )
            time.sleep(0.5)
    except UNREACHABLE as exc:
        raise NodeContainerError(f"Docker at {config.docker_host}: {exc}") from exc
    return container_id


def _answers(path: str) -> bool:
    """Does a plugin answer Plugin.Activate on the unix socket ``path``?"""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(2)
        probe.connect(path)
        probe.sendall(b"POST /Plugin.Activate HTTP/1.0\r\nContent-Length: 0\r\n\r\n")
        return b" 200 " in probe.recv(64)
    except OSError:
        return False
    finally:
        probe.close()
