"""Settings shared by the node, the plugin and the CLI.

Each setting has one environment variable and one flag of the same meaning
(``ETCD_ENDPOINTS`` / ``--etcd-endpoints`` ...).  Flags win over the
environment; the node passes its final settings to the plugin process it
starts through the same environment variables, so both always agree.
"""

from __future__ import annotations

import argparse
import os
import socket
from dataclasses import dataclass, field, fields

from calicnm.errors import InvalidRequest
from calicnm.profiles import ENDPOINT_TO_HOST_ACTIONS

DEFAULT_SOCKET = "/run/docker/plugins/calicnm.sock"
DEFAULT_STATE_DIR = "/var/lib/calicnm"
DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"


@dataclass(frozen=True)
class Setting:
    env: str
    flag: str
    help: str
    default: str | None = None


SETTINGS = {
    "etcd_endpoints": Setting(
        "ETCD_ENDPOINTS",
        "--etcd-endpoints",
        "comma-separated etcd URLs; unset: the node runs an embedded local etcd",
    ),
    "etcd_trusted_ca_file": Setting(
        "ETCD_TRUSTED_CA_FILE", "--etcd-trusted-ca-file", "CA bundle for https etcd endpoints"
    ),
    "etcd_cert_file": Setting("ETCD_CERT_FILE", "--etcd-cert-file", "client certificate for etcd"),
    "etcd_key_file": Setting("ETCD_KEY_FILE", "--etcd-key-file", "client key for etcd"),
    "hostname": Setting(
        "CALICNM_HOSTNAME", "--hostname", "this host's name in calicnm (default: host name)"
    ),
    "ip": Setting(
        "CALICNM_IP", "--ip", "this host's address, as other hosts reach it (default: detected)"
    ),
    "as_num": Setting(
        "CALICNM_AS", "--as", "this host's BGP AS number (default: the global default-node-as)"
    ),
    "socket": Setting("CALICNM_SOCKET", "--socket", "plugin socket path", DEFAULT_SOCKET),
    "log_level": Setting(
        "CALICNM_LOG_LEVEL", "--log-level", "DEBUG, INFO, WARNING or ERROR", "INFO"
    ),
    "state_dir": Setting(
        "CALICNM_STATE_DIR", "--state-dir", "node state (embedded etcd data)", DEFAULT_STATE_DIR
    ),
    "docker_host": Setting(
        "DOCKER_HOST",
        "--docker-host",
        "Docker API socket, used to learn network names",
        DEFAULT_DOCKER_HOST,
    ),
    "resync_interval": Setting(
        "CALICNM_RESYNC_INTERVAL",
        "--resync-interval",
        "seconds between the agent's full resyncs (drift repair)",
        "30",
    ),
    "endpoint_to_host_action": Setting(
        "CALICNM_ENDPOINT_TO_HOST_ACTION",
        "--endpoint-to-host-action",
        "what a container may do to its own host once its policy allows it: drop "
        "(the default), accept, or return (to the host's INPUT chain)",
        "drop",
    ),
    "accept_new_datastore": Setting(
        "CALICNM_ACCEPT_NEW_DATASTORE",
        "--accept-new-datastore",
        "true: serve this etcd although it is not the datastore this host served before "
        "(an empty or another cluster's etcd); it then becomes this host's datastore",
        "false",
    ),
    "withdraw_on_exit": Setting(
        "CALICNM_WITHDRAW_ON_EXIT",
        "--withdraw-on-exit",
        "true: on a clean stop, shut BIRD down so peers withdraw this host's routes at once "
        "(by default BIRD and the routes stay up across a node restart)",
        "false",
    ),
    "no_default_pools": Setting(
        "CALICNM_NO_DEFAULT_POOLS",
        "--no-default-pools",
        "true: do not create the default pool 192.168.0.0/16",
        "false",
    ),
}


FLAGS = ("no_default_pools", "accept_new_datastore", "withdraw_on_exit")
"""Settings given on the command line as a bare flag (meaning "true")."""

ALIASES: dict[str, tuple[str, ...]] = {
    "etcd_trusted_ca_file": ("ETCD_CA_CERT_FILE",),
    "endpoint_to_host_action": ("FELIX_DEFAULTENDPOINTTOHOSTACTION",),
}
"""Calico's names for the same settings, read when calicnm's own is unset."""


def add_arguments(
    parser: argparse.ArgumentParser, names: list[str], subcommand: bool = False
) -> None:
    """Add the flags of ``names``.  On a subcommand an absent flag must not
    overwrite the same flag given before the subcommand, hence SUPPRESS."""
    default = argparse.SUPPRESS if subcommand else None
    for name in names:
        s = SETTINGS[name]
        env_note = f" [env {s.env}]"
        if name in FLAGS:
            parser.add_argument(
                s.flag,
                dest=name,
                action="store_const",
                const="true",
                default=default,
                help=s.help + env_note,
            )
        else:
            parser.add_argument(s.flag, dest=name, default=default, help=s.help + env_note)


@dataclass(frozen=True)
class Config:
    etcd_endpoints: str | None = None
    etcd_trusted_ca_file: str | None = None
    etcd_cert_file: str | None = None
    etcd_key_file: str | None = None
    hostname: str = field(default_factory=socket.gethostname)
    ip: str | None = None
    as_num: str | None = None
    socket: str = DEFAULT_SOCKET
    log_level: str = "INFO"
    state_dir: str = DEFAULT_STATE_DIR
    docker_host: str = DEFAULT_DOCKER_HOST
    no_default_pools: str = "false"
    accept_new_datastore: str = "false"
    withdraw_on_exit: str = "false"
    resync_interval: str = "30"
    endpoint_to_host_action: str = "drop"

    @classmethod
    def from_env(
        cls, args: argparse.Namespace | None = None, environ: dict[str, str] | None = None
    ) -> Config:
        env = os.environ if environ is None else environ
        values: dict[str, str] = {}
        for f in fields(cls):
            s = SETTINGS[f.name]
            flag_value = getattr(args, f.name, None) if args is not None else None
            value = flag_value if flag_value is not None else env.get(s.env)
            if value is None:
                value = next((env[n] for n in ALIASES.get(f.name, ()) if n in env), None)
            if value not in (None, ""):
                values[f.name] = str(value)
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        """The environment that gives a child process these same settings."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[SETTINGS[f.name].env] = str(value)
        return out

    @property
    def as_number(self) -> int | None:
        if self.as_num is None:
            return None
        from calicnm.model import check_as

        return check_as(self.as_num)

    @property
    def agent_status_path(self) -> str:
        """Where the agent reports its health (read by Join and status)."""
        return os.path.join(self.state_dir, "agent-status.json")

    @property
    def marker_dir(self) -> str:
        """Where the agent marks endpoints as programmed (read by Join)."""
        return os.path.join(self.state_dir, "programmed")

    @property
    def resync_seconds(self) -> float:
        try:
            value = float(self.resync_interval)
        except ValueError:
            value = 30.0
        return max(value, 1.0)

    @property
    def endpoint_to_host(self) -> str:
        """The checked endpoint-to-host action (lower case)."""
        action = self.endpoint_to_host_action.lower()
        if action not in ENDPOINT_TO_HOST_ACTIONS:
            raise InvalidRequest(
                f"endpoint-to-host action {self.endpoint_to_host_action!r} is not one of "
                f"{', '.join(ENDPOINT_TO_HOST_ACTIONS)}"
            )
        return action

    @property
    def cluster_id_path(self) -> str:
        """Where the node remembers the datastore it serves."""
        return os.path.join(self.state_dir, "cluster-id")

    @property
    def lock_path(self) -> str:
        """The lock one node per host holds while it runs."""
        return os.path.join(self.state_dir, "node.lock")

    @property
    def accepts_new_datastore(self) -> bool:
        return _true(self.accept_new_datastore)

    @property
    def withdraws_on_exit(self) -> bool:
        return _true(self.withdraw_on_exit)

    @property
    def default_pools(self) -> bool:
        return not _true(self.no_default_pools)


def _true(text: str) -> bool:
    return text.lower() in ("1", "true", "yes")
