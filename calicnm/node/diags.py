"""``calicnm diags``: one tarball with what a support engineer asks for first:
the host's links, addresses, routes, neighbours, iptables and ipsets; the
calicnm tree in etcd; the effective settings with their sources; BIRD's
configuration and its protocols; the node's journal and the embedded etcd's
log; Docker's view of its calicnm networks; and ``calicnm status``.  Never a
key file's contents: settings name key files, the archive does not hold them.

Every source is collected independently: a command that is missing or
fails, or an etcd that cannot be reached, is recorded in that file and
the rest is still collected (diagnostics matter most when something is
broken).
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import tarfile
import time
from collections.abc import Callable
from dataclasses import fields

from calicnm.config import SETTINGS, Config
from calicnm.node.docker_api import UNREACHABLE, DockerAPI
from calicnm.store import keys
from calicnm.store.kv import Store

COMMANDS = {
    "date.txt": ["date", "-u"],
    "ip-link.txt": ["ip", "-d", "link", "show"],
    "ip-addr.txt": ["ip", "-4", "addr", "show"],
    "ip-route.txt": ["ip", "-4", "route", "show", "table", "all"],
    "ip-neigh.txt": ["ip", "-4", "neigh", "show"],
    "iptables-save.txt": ["iptables-save"],
    "ipset-list.txt": ["ipset", "list"],
    "sysctl-net.txt": [
        "sysctl",
        "-a",
        "-r",
        r"net\.ipv4\.(ip_forward|conf\..*\.(rp_filter|proxy_arp|forwarding))",
    ],
}


def _run(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"$ {' '.join(argv)}\nfailed to run: {exc}\n"
    return f"$ {' '.join(argv)} (exit {proc.returncode})\n{proc.stdout}{proc.stderr}"


def _etcd_dump(store: Store) -> str:
    lines = []
    for kv in store.list(keys.ROOT + "/"):
        lines.append(f"{kv.key} (rev {kv.revision})\n  {kv.value}")
    return "\n".join(lines) + "\n"


def _tail(path: str, limit: int = 200_000) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - limit))
            return fh.read().decode(errors="replace")
    except OSError as exc:
        return f"cannot read {path}: {exc}\n"


def host_commands(config: Config) -> dict[str, list[str]]:
    """``COMMANDS``, and those that depend on this node's settings."""
    return {
        **COMMANDS,
        "bird-protocols.txt": [
            "birdc",
            "-s",
            os.path.join(config.state_dir, "bird.ctl"),
            "show",
            "protocols",
            "all",
        ],
        "node-journal.txt": ["journalctl", "-u", "calicnm", "--no-pager", "-n", "5000"],
        "bpf-attachments.txt": ["bpftool", "net", "show"],
        "bpf-pins.txt": ["find", config.bpf_dir, "-maxdepth", "2"],
    }


def docker_networks(docker: DockerAPI) -> str:
    """``docker network inspect`` of every calicnm network Docker has."""
    try:
        found = docker.calicnm_networks()
    except UNREACHABLE as exc:
        return f"cannot ask Docker: {exc}\n"
    return json.dumps(found, indent=2, sort_keys=True) + "\n"


def collect(
    config: Config,
    store: Store,
    out_dir: str,
    status: Callable[[], str],
    run: Callable[[list[str]], str] = _run,
    sources: dict[str, str] | None = None,
    docker: Callable[[], str] | None = None,
) -> str:
    """Write the tarball into ``out_dir``; returns its path.  ``run`` turns
    each of ``host_commands`` into its file's text, recording a failure in it
    rather than raising (default: run it here); ``sources`` says where each
    setting came from (``Config.load``); ``docker`` gives Docker's view of
    its calicnm networks (default: ask ``config.docker_host``)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    name = f"calicnm-diags-{config.hostname}-{stamp}"
    path = os.path.join(out_dir, f"{name}.tar.gz")
    files: dict[str, str] = {"hostname.txt": socket.gethostname() + "\n"}
    files["config.txt"] = "".join(
        f"{SETTINGS[name].env}={value}  # {(sources or {}).get(name, 'given')}\n"
        for name, value in sorted((f.name, getattr(config, f.name)) for f in fields(config))
        if value is not None
    )
    files["status.txt"] = status()
    for filename, argv in host_commands(config).items():
        files[filename] = run(argv)
    files["bird.conf"] = _tail(os.path.join(config.state_dir, "bird.conf"))
    files["docker-networks.json"] = (
        docker() if docker is not None else docker_networks(DockerAPI(config.docker_host))
    )
    try:
        files["etcd-calicnm.txt"] = _etcd_dump(store)
    except Exception as exc:  # record whatever went wrong; collect the rest
        files["etcd-calicnm.txt"] = f"cannot read etcd: {exc}\n"
    files["etcd.log"] = _tail(os.path.join(config.state_dir, "etcd.log"))
    # 0600 from the first byte, whatever the umask: the archive holds the
    # datastore's contents (BGP password included).
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
        for filename, text in sorted(files.items()):
            data = text.encode()
            info = tarfile.TarInfo(f"{name}/{filename}")
            info.size, info.mtime, info.mode = len(data), int(time.time()), 0o600
            tar.addfile(info, io.BytesIO(data))
    return path
