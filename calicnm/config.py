"""Settings shared by the node, the plugin and the CLI.

Each setting has one environment variable and one flag of the same meaning
(``ETCD_ENDPOINTS`` / ``--etcd-endpoints`` ...), and may be written in the
configuration file, ``/etc/calicnm/calicnm.env`` unless ``CALICNM_CONFIG_FILE``
(or ``--config``) names another: ``NAME=value`` lines, as systemd's
``EnvironmentFile=`` reads them.  Precedence: flags, then the environment,
then the file, then the defaults; ``Config.sources`` says where each value
came from.  The node passes its final settings to the plugin process it
starts through the same environment variables, so both always agree.

A missing default file is no error (a host configured by its environment);
a file named explicitly must exist, and a line that is not ``NAME=value``,
or a ``CALICNM_``/``ETCD_`` name that is not a setting (a typo), is refused
with its line number.  Other names (another program's, in a shared file)
are ignored.
"""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from calicnm.errors import InvalidRequest
from calicnm.profiles import ENDPOINT_TO_HOST_ACTIONS

DEFAULT_SOCKET = "/run/docker/plugins/calicnm.sock"
DEFAULT_STATE_DIR = "/var/lib/calicnm"
DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"
DEFAULT_CONFIG_FILE = "/etc/calicnm/calicnm.env"
CONFIG_FILE_ENV = "CALICNM_CONFIG_FILE"
MAX_CONFIG_BYTES = 64 * 1024


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
    "reconcile_interval": Setting(
        "CALICNM_RECONCILE_INTERVAL",
        "--reconcile-interval",
        "seconds between the node's ownership checks, which collect what crashes and lost "
        "Docker calls left (stale endpoint records, orphan veths, leaked addresses); a "
        "finding is repaired once seen this long apart (at least 5 s)",
        "60",
    ),
    "liveness_ttl": Setting(
        "CALICNM_LIVENESS_TTL",
        "--liveness-ttl",
        "seconds a node's liveness record outlives the node if it dies without stopping "
        "(its etcd lease; at least 2); a clean stop removes it at once",
        "30",
    ),
    "pending_max_age": Setting(
        "CALICNM_PENDING_MAX_AGE",
        "--pending-max-age",
        "seconds after which an address Docker requested but never used is freed",
        "300",
    ),
    "metrics_address": Setting(
        "CALICNM_METRICS_ADDRESS",
        "--metrics-address",
        "HOST:PORT to serve Prometheus metrics on, e.g. 127.0.0.1:9091 (unset: off)",
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
    "iptables_backend": Setting(
        "CALICNM_IPTABLES_BACKEND",
        "--iptables-backend",
        "host (this system's iptables command), auto (whichever backend holds dockerd's "
        "rules; the node image's default), nft or legacy",
        "host",
    ),
    "datapath": Setting(
        "CALICNM_DATAPATH",
        "--datapath",
        "auto (the tc/BPF same-host fast path where it can load, else iptables alone), "
        "bpf (the fast path, or fail) or iptables (no fast path)",
        "auto",
    ),
    "bpf_dir": Setting(
        "CALICNM_BPF_DIR",
        "--bpf-dir",
        "where the fast path pins its program and maps (on the BPF filesystem)",
        "/sys/fs/bpf/calicnm",
    ),
    "driver_name": Setting(
        "CALICNM_DRIVER_NAME",
        "--driver-name",
        "the driver name this host's Docker knows the plugin by, used for cluster networks: "
        "calicnm, or the managed plugin's NAME:TAG (calicnm/calicnm:latest)",
        "calicnm",
    ),
    "no_default_pools": Setting(
        "CALICNM_NO_DEFAULT_POOLS",
        "--no-default-pools",
        "true: do not create the default pool 192.168.0.0/16",
        "false",
    ),
}


DATAPATHS = ("auto", "bpf", "iptables")

FLAGS = ("no_default_pools", "accept_new_datastore", "withdraw_on_exit")
"""Settings given on the command line as a bare flag (meaning "true")."""

ALIASES: dict[str, tuple[str, ...]] = {
    "etcd_trusted_ca_file": ("ETCD_CA_CERT_FILE",),
    "hostname": ("NODENAME",),
    "endpoint_to_host_action": ("FELIX_DEFAULTENDPOINTTOHOSTACTION",),
    "iptables_backend": ("FELIX_IPTABLESBACKEND",),
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
    reconcile_interval: str = "60"
    liveness_ttl: str = "30"
    pending_max_age: str = "300"
    metrics_address: str | None = None
    endpoint_to_host_action: str = "drop"
    iptables_backend: str = "host"
    datapath: str = "auto"
    bpf_dir: str = "/sys/fs/bpf/calicnm"
    driver_name: str = "calicnm"

    @classmethod
    def from_env(
        cls, args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None
    ) -> Config:
        return cls.load(args, environ)[0]

    @classmethod
    def load(
        cls, args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None
    ) -> tuple[Config, dict[str, str]]:
        """The settings, and for each the source of its value: ``flag``,
        ``env NAME``, ``file PATH`` or ``default``."""
        env = os.environ if environ is None else environ
        path, named = config_file_path(args, env)
        file_values = read_config_file(path, required=named)
        values: dict[str, str] = {}
        sources: dict[str, str] = {}
        for f in fields(cls):
            flag_value = getattr(args, f.name, None) if args is not None else None
            if flag_value not in (None, ""):
                values[f.name], sources[f.name] = str(flag_value), "flag"
                continue
            for source, mapping in (("env", env), (f"file {path}", file_values)):
                found = _lookup(f.name, mapping)
                if found is not None:
                    name, value = found
                    values[f.name] = value
                    sources[f.name] = f"env {name}" if source == "env" else source
                    break
            else:
                sources[f.name] = "default"
        return cls(**values), sources

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
        return _seconds(self.resync_interval, "resync interval", 1.0)

    @property
    def reconcile_seconds(self) -> float:
        return _seconds(self.reconcile_interval, "reconcile interval", 1.0)

    @property
    def liveness_ttl_seconds(self) -> int:
        """Whole seconds (etcd's leases count in seconds), at least etcd's 2."""
        return max(2, round(_seconds(self.liveness_ttl, "liveness TTL", 2.0)))

    @property
    def pending_max_age_seconds(self) -> float:
        return _seconds(self.pending_max_age, "pending max age", 10.0)

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
    def datapath_mode(self) -> str:
        """The checked data-path choice (lower case): auto, bpf or iptables."""
        mode = self.datapath.lower()
        if mode not in DATAPATHS:
            raise InvalidRequest(
                f"data path {self.datapath!r} is not one of {', '.join(DATAPATHS)}"
            )
        return mode

    @property
    def network_problems_path(self) -> str:
        """Where the node lists networks it uses that Docker does not name."""
        return os.path.join(self.state_dir, "network-problems")

    @property
    def in_flight_dir(self) -> str:
        """Where the plugin marks the ids its Docker calls are working on."""
        return os.path.join(self.state_dir, "in-flight")

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


def _lookup(name: str, mapping: Mapping[str, str]) -> tuple[str, str] | None:
    """(variable, value) of setting ``name`` in ``mapping``: its own variable,
    else the first alias set; empty values count as unset."""
    for variable in (SETTINGS[name].env, *ALIASES.get(name, ())):
        value = mapping.get(variable)
        if value not in (None, ""):
            return variable, str(value)
    return None


def config_file_path(
    args: argparse.Namespace | None, environ: Mapping[str, str]
) -> tuple[str, bool]:
    """The configuration file to read, and whether it was named explicitly."""
    flag = getattr(args, "config", None) if args is not None else None
    named = flag or environ.get(CONFIG_FILE_ENV)
    return (str(named), True) if named else (DEFAULT_CONFIG_FILE, False)


def read_config_file(path: str, required: bool = False) -> dict[str, str]:
    """``NAME=value`` lines of ``path`` (``#`` comments, blank lines, an
    optional ``export``, values optionally in single or double quotes).
    InvalidRequest, naming the line, for anything else."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        if required:
            raise InvalidRequest(f"configuration file {path} does not exist") from None
        return {}
    except OSError as exc:
        raise InvalidRequest(f"cannot read configuration file {path}: {exc.strerror}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise InvalidRequest(f"configuration file {path} is larger than 64 KiB")
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise InvalidRequest(f"configuration file {path} is not UTF-8") from None
    known = {s.env for s in SETTINGS.values()} | {a for v in ALIASES.values() for a in v}
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").strip()
        name, sep, value = line.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name:
            raise InvalidRequest(f"{path}:{number}: expected NAME=value")
        if name not in known:
            if name.startswith(("CALICNM_", "ETCD_")):  # a typo in a name of ours
                raise InvalidRequest(f"{path}:{number}: {name} is not a calicnm setting")
            continue  # another program's setting in a shared file
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        if "\0" in value:
            raise InvalidRequest(f"{path}:{number}: {name} holds a NUL character")
        values[name] = value
    return values


def _seconds(text: str, what: str, least: float) -> float:
    """A positive number of seconds, at least ``least``; InvalidRequest
    for anything else."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value == value or value <= 0 or value == float("inf"):  # NaN, <= 0, inf
        raise InvalidRequest(f"{what} must be a positive number of seconds, not {text!r}")
    return max(value, least)


def _true(text: str) -> bool:
    return text.lower() in ("1", "true", "yes")
