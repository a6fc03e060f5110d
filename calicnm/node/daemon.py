"""``calicnm node run``: one host's calicnm, in the foreground.

Start order, each step bounded in time and failing with a one-line reason:
1. one node per host: an exclusive lock in the state directory, and no one
   answering on the plugin socket; a second node refuses here, having
   touched nothing of the first (socket, etcd, BIRD, kernel);
2. kernel checks (rp_filter), IP forwarding, the gateways' local route;
3. etcd: the cluster in ``ETCD_ENDPOINTS``, or an embedded single-member
   etcd with data under the state dir when it is unset;
4. the datastore's identity (``store.identity``): a datastore that is not
   the one this host served (empty, or another cluster) is refused unless
   ``--accept-new-datastore``, and the kernel is left as it was;
5. defaults in etcd (the default pool), this host's registration (its record
   and the claim on its address, ``store.registration``) and its liveness
   record on an etcd lease (``node.liveness``, kept alive by its own thread);
6. one full agent pass, so a restarted node has converged the kernel
   (chains, ipsets, routes) before it serves Docker again; if it fails the
   node still starts, reports it (Join then refuses) and keeps retrying;
7. the agent thread (watches etcd, keeps the kernel equal to it, names
   new networks) and the plugin (gunicorn on the Docker plugin socket; a
   stale socket is removed first);
8. the ownership collector thread (``node.collector``): at once, then every
   ``--reconcile-interval`` seconds, it collects what crashes and lost
   Docker calls left behind; it never acts on a foreign datastore, and
   waits while Docker does not answer for what only Docker can judge;
9. the cluster networks thread (``node.cluster_networks``): keeps the
   networks defined with ``calicnm network create`` on this host's Docker.

Then it tells the service manager it is ready (``node.service_notify``;
systemd's ``Type=notify``: the plugin answers and the first pass has run),
and the main loop keeps the host record current and restarts a child or
the agent thread that died.  SIGTERM or SIGINT stops the plugin and the
agent, revokes the liveness lease (the record goes at once), removes the
socket it created, stops the embedded etcd and exits 0.
Everything else stays: chains, ipsets, endpoint routes and BIRD (so peers
keep this host's routes and cross-host flows survive a restart or an
upgrade).  ``--withdraw-on-exit`` shuts BIRD down on the way out, for a
host leaving for good; ``calicnm node remove`` cleans its records.
"""

from __future__ import annotations

import dataclasses
import fcntl
import ipaddress
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from calicnm.config import Config
from calicnm.errors import (
    CalicnmError,
    DatastoreUnavailable,
    ForeignDatastore,
    InvalidRequest,
)
from calicnm.faults import NODE_PID_ENV
from calicnm.host.fastpath import FastPath, unavailable
from calicnm.host.ipsets import Ipsets
from calicnm.host.iptables import Iptables, detect_backend
from calicnm.host.markers import InFlight, Markers, StatusFile
from calicnm.host.netlink import HostPlumbing, ensure_gateway_route, host_addresses
from calicnm.host.policy_applier import PolicyApplier
from calicnm.host.sysctl import check_kernel_settings, ensure_forwarding
from calicnm.ipam import Allocator
from calicnm.model import Host, Liveness
from calicnm.node.agent import Agent
from calicnm.node.children import Child, embedded_etcd, gunicorn, wait_for
from calicnm.node.cluster_networks import ClusterNetworkSync
from calicnm.node.collector import OwnershipCollector, node_grace
from calicnm.node.docker_api import DockerAPI
from calicnm.node.liveness import Heartbeat, calicnm_version
from calicnm.node.metrics import NodeFigures, NodeMetrics, parse_address
from calicnm.node.network_names import NetworkNamer
from calicnm.node.service_notify import NOTIFY_ENV, notify
from calicnm.routing.bgp import parse_protocols
from calicnm.routing.bird import Bird
from calicnm.routing.route_sync import BgpSync, EncapSync
from calicnm.store import keys, records
from calicnm.store.etcd import EtcdStore
from calicnm.store.identity import (
    DatastoreGuard,
    claim_cluster_id,
    new_cluster_id,
    read_cluster_id,
)
from calicnm.store.kv import Store
from calicnm.store.records import Snapshot
from calicnm.store.registration import register_host
from calicnm.validation import check_hostname
from calicnm.wiring import (
    EMBEDDED_ETCD_URL,
    build_store,
    remember_cluster_id,
    remembered_cluster_id,
)

_log = logging.getLogger(__name__)

AGENT_RESTART_LIMIT = 5
AGENT_RESTART_WINDOW = 60.0
HOST_RECORD_REFRESH_SECONDS = 10.0
"""How often the node checks its host record (its address may change, or the
record may have been removed); it writes only when the record differs."""
CHILD_POLL_SECONDS = 1.0
_SKIP_IFACES = ("lo", "docker", "cali", "tmp", "veth", "br-", "vxlan", "tunl", "virbr")


def choose_fast_path(config: Config) -> FastPath | None:
    """The same-host fast path the node runs, per ``CALICNM_DATAPATH``: ``bpf`` insists
    (a missing tool or object is a configuration error), ``auto`` takes it where it can
    load and says why not otherwise.  Whenever the node runs without it, any program a
    previous run left attached and pinned is removed first."""
    fast_path = FastPath(HostPlumbing(), Path(config.bpf_dir))
    mode = config.datapath_mode
    problem = "CALICNM_DATAPATH=iptables" if mode == "iptables" else unavailable()
    if problem is None:
        _log.info("data path: iptables policy with the tc/BPF same-host fast path")
        return fast_path
    if mode == "bpf":
        raise InvalidRequest(f"CALICNM_DATAPATH=bpf, but {problem}")
    # A program a previous run left attached would go on handing pairs across with
    # nobody keeping its map equal to policy: it goes.
    fast_path.remove()
    _log.log(
        logging.INFO if mode == "iptables" else logging.WARNING,
        "data path: iptables alone (%s)",
        problem,
    )
    return None


class AnotherNode(CalicnmError):
    """A node already runs on this host; this one refuses to start."""


class NodeLock:
    """An exclusive ``flock`` on a file in the state directory, held for the
    node's life (the kernel drops it when the process dies, however it dies)."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self._fd, 32).decode(errors="replace").strip() or "?"
            os.close(self._fd)
            raise AnotherNode(
                f"another calicnm node (pid {holder}) is running on this host with state "
                f"directory {os.path.dirname(path)}; stop it first (this one touched nothing)"
            ) from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, str(os.getpid()).encode())

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def refuse_live_socket(path: str) -> None:
    """Refuse to start while someone answers on the plugin socket (a node
    with another state directory, say); a socket nobody answers on is stale
    and is replaced later."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(path)
    except OSError:
        return
    finally:
        probe.close()
    raise AnotherNode(f"a plugin is already serving {path}; is another calicnm node running?")


def adopt_datastore(store: Store, config: Config, where: str) -> str:
    """The cluster id this node serves (see ``store.identity``): the one it
    served before, if the datastore still carries it; on a host's first start,
    the datastore's (written now if it has none).  A datastore with another
    id, or none, is refused unless the operator accepted it."""
    remembered = remembered_cluster_id(config)
    found = read_cluster_id(store)
    if remembered is not None and found != remembered and not config.accepts_new_datastore:
        raise ForeignDatastore(
            f"the datastore at {where} is not the one this host served (cluster "
            f"id {remembered}, found {found or 'none'}); nothing was changed. If it is meant "
            "to replace the old one, start the node with --accept-new-datastore"
        )
    cluster_id = claim_cluster_id(store, new_cluster_id())
    if cluster_id != remembered:
        remember_cluster_id(config, cluster_id)
    return cluster_id


class AgentDied(CalicnmError):
    """The agent thread kept ending; the node exits non-zero."""


def detect_ip(addresses: list[tuple[str, str]]) -> str | None:
    """First global IPv4 address on an interface that is not calicnm's or
    Docker's own (the address other hosts will reach this one at)."""
    for ifname, addr in addresses:
        if ifname.startswith(_SKIP_IFACES):
            continue
        ip = ipaddress.IPv4Address(addr)
        if ip.is_loopback or ip.is_link_local:
            continue
        return addr
    return None


class Node:
    def __init__(self, config: Config) -> None:
        self.config = config
        self._stop = threading.Event()
        self._etcd: Child | None = None
        self._plugin: Child | None = None
        self._store: EtcdStore | None = None
        self._agent_thread: threading.Thread | None = None
        self._agent_restarts: list[float] = []
        self._lock: NodeLock | None = None
        self._socket_owned = False
        self._bird: Bird | None = None
        self._collector_thread: threading.Thread | None = None
        self._metrics: NodeMetrics | None = None
        self._heartbeat: Heartbeat | None = None
        self._heartbeat_thread: threading.Thread | None = None

    def request_stop(self, signum: int, _frame: FrameType | None) -> None:
        _log.info("signal %d received; stopping", signum)
        self._stop.set()

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        # The notification socket is the node's alone: a child that saw it
        # (etcd notifies too) would tell the service manager "ready" early.
        manager = {NOTIFY_ENV: os.environ.pop(NOTIFY_ENV, "")}
        try:
            self._start()
            notify(f"READY=1\nSTATUS=serving Docker on {self.config.socket}", manager)
            _log.info("node ready socket=%s", self.config.socket)
            self._loop()
        finally:
            notify("STOPPING=1", manager)
            self._shutdown()
        return 0

    def _start(self) -> None:
        config = self.config
        check_hostname(config.hostname, "this host's name (CALICNM_HOSTNAME)")
        # Refuse a bad setting before anything starts.
        _ = (config.endpoint_to_host, config.resync_seconds, config.reconcile_seconds)
        _ = config.datapath_mode
        _ = config.pending_max_age_seconds
        if config.metrics_address:
            parse_address(config.metrics_address)
        os.makedirs(config.state_dir, mode=0o700, exist_ok=True)
        # One node per host, decided before anything is touched: a second
        # node leaves the first one's socket, etcd, BIRD and kernel alone.
        self._lock = NodeLock(config.lock_path)
        refuse_live_socket(config.socket)
        check_kernel_settings()
        ensure_forwarding()
        ensure_gateway_route()
        if not config.etcd_endpoints:
            self._etcd = embedded_etcd(config.state_dir)
            self._etcd.start()
            config = dataclasses.replace(config, etcd_endpoints=EMBEDDED_ETCD_URL)
            self.config = config
        store = build_store(config)
        self._store = store
        wait_for(lambda: self._etcd_ready(store), f"etcd at {store.describe()}", timeout=60)
        _log.info("etcd ready endpoints=%s; docker=%s", store.describe(), config.docker_host)
        for url in store.insecure_remote_endpoints():
            _log.warning(
                "etcd endpoint %s is not on this host and not TLS: anyone on the network can "
                "read and change every host's policy; use https with client certificates "
                "(ETCD_TRUSTED_CA_FILE, ETCD_CERT_FILE, ETCD_KEY_FILE)",
                url,
            )

        cluster_id = adopt_datastore(store, config, store.describe())
        _log.info("datastore cluster_id=%s", cluster_id)

        ip = config.ip or detect_ip(host_addresses())
        if ip is None:
            raise InvalidRequest("cannot detect this host's address; pass --ip or CALICNM_IP")
        register_host(store, Host(name=config.hostname, ip=ip, as_num=config.as_number))
        _log.info("host registered name=%s ip=%s", config.hostname, ip)
        self._start_heartbeat(store)
        if config.default_pools and Allocator(store, config.hostname).ensure_default_pool():
            _log.info("default pool created")

        namer = NetworkNamer(
            store,
            DockerAPI(config.docker_host),
            problems_path=config.network_problems_path,
        )
        hooks: list[Callable[[Snapshot], bool]] = [
            lambda snap: namer.tick(
                list(snap.networks.values()),
                {ep.network_id for ep in snap.endpoints_of(config.hostname)},
            )
        ]
        hooks.append(EncapSync(config.hostname, os.path.join(config.state_dir, "problems")))
        if Bird.available():
            self._bird = Bird(config.state_dir)
            hooks.append(BgpSync(self._bird, config.hostname))
        else:
            _log.warning("bird is not installed: routes to other hosts are not distributed")
        metrics = self._metrics = (
            NodeMetrics(os.path.join(config.state_dir, "metrics"), self._figures)
            if config.metrics_address
            else None
        )
        self._agent = Agent(
            store,
            config.hostname,
            PolicyApplier(
                Iptables(
                    detect_backend(config.iptables_backend.lower()),
                    on_error=metrics.iptables_errors.inc if metrics else None,
                ),
                Ipsets(on_error=metrics.ipset_errors.inc if metrics else None),
            ),
            HostPlumbing(),
            Markers(config.marker_dir),
            resync=config.resync_seconds,
            hooks=hooks,
            endpoint_to_host=config.endpoint_to_host,
            status=StatusFile(config.agent_status_path),
            guard=DatastoreGuard(store, cluster_id, ttl=0.0),
            on_pass=metrics.observe_pass if metrics else None,
            fast_path=choose_fast_path(config),
        )
        try:
            self._agent.first_pass()
            _log.info("kernel converged with etcd")
        except Exception as exc:  # serve what can be served; the agent retries
            _log.error("the first pass failed; the agent keeps retrying: %s", exc)
        self._start_agent()
        self._start_plugin()
        if metrics is not None and config.metrics_address:
            metrics.serve(config.metrics_address)
        agent = self._agent
        sweep_guard = DatastoreGuard(store, cluster_id, ttl=0.0)
        self._collector = OwnershipCollector(
            store,
            config.hostname,
            HostPlumbing(),
            DockerAPI(config.docker_host),
            pending_max_age=config.pending_max_age_seconds,
            guard=lambda: sweep_guard.check(agent.current_copy()),
            busy=InFlight(config.in_flight_dir).active,
            reader=self._agent.datastore_reader,
            decoded=self._agent.decoded_view,
        )
        self._collector_thread = threading.Thread(
            target=self._collect, name="collector", daemon=True
        )
        self._collector_thread.start()
        networks = ClusterNetworkSync(
            store, config.hostname, DockerAPI(config.docker_host), config.driver_name
        )
        threading.Thread(
            target=networks.run, args=(self._stop, store.watch), name="networks", daemon=True
        ).start()

    def _start_heartbeat(self, store: EtcdStore) -> None:
        """This node's liveness record on its etcd lease (``node.liveness``),
        kept alive by a thread of its own so that a slow pass elsewhere never
        delays a keepalive; revoked in ``_shutdown``."""
        record = Liveness(self.config.hostname, os.getpid(), time.time(), calicnm_version())
        heartbeat = self._heartbeat = Heartbeat(store, record, self.config.liveness_ttl_seconds)
        self._heartbeat_thread = threading.Thread(
            target=heartbeat.run, args=(self._stop,), name="liveness", daemon=True
        )
        self._heartbeat_thread.start()

    def _collect(self) -> None:
        """The collector thread: one sweep now, then one per interval, until
        the node stops.  A sweep that fails is logged and the next one runs."""
        interval = self.config.reconcile_seconds
        grace = node_grace(interval)
        while not self._stop.is_set():
            try:
                report = self._collector.sweep(grace)
                waiting = [f for f in report.findings if f not in report.repaired]
                if report.repaired or report.failed:
                    _log.info(
                        "ownership sweep: %d repaired, %d failed, %d waiting",
                        len(report.repaired),
                        len(report.failed),
                        len(waiting),
                    )
                for finding in waiting:
                    _log.debug("ownership finding %s %s: %s", *finding.key[:2], finding.detail)
            except CalicnmError as exc:
                _log.warning("ownership sweep skipped: %s", exc)
            except Exception:  # the collector must outlive any one sweep
                _log.exception("ownership sweep failed unexpectedly")
            self._stop.wait(interval)

    def _start_agent(self) -> None:
        store = self._store
        assert store is not None  # set before the agent is built
        self._agent_thread = threading.Thread(
            target=self._agent.run, args=(self._stop, store), name="agent", daemon=True
        )
        self._agent_thread.start()

    def _supervise_agent(self) -> None:
        """Restart an agent thread that ended (it never should: every pass
        catches everything).  Past ``AGENT_RESTART_LIMIT`` restarts within
        ``AGENT_RESTART_WINDOW`` seconds the node gives up and exits non-zero,
        so its supervisor (systemd) restarts the whole node."""
        thread = self._agent_thread
        if thread is None or thread.is_alive() or self._stop.is_set():
            return
        now = time.monotonic()
        self._agent_restarts = [t for t in self._agent_restarts if now - t < AGENT_RESTART_WINDOW]
        if len(self._agent_restarts) >= AGENT_RESTART_LIMIT:
            raise AgentDied(
                f"the agent thread ended {len(self._agent_restarts) + 1} times in "
                f"{AGENT_RESTART_WINDOW:.0f}s; stopping the node"
            )
        self._agent_restarts.append(now)
        _log.error("the agent thread ended; restarting it")
        self._start_agent()

    def _etcd_ready(self, store: EtcdStore) -> bool:
        if self._etcd is not None and not self._etcd.alive():
            raise CalicnmError(
                f"embedded etcd exited; see {os.path.join(self.config.state_dir, 'etcd.log')}"
            )
        try:
            store.get(keys.config("ready"))
        except DatastoreUnavailable:
            return False
        return True

    def _start_plugin(self) -> None:
        path = self.config.socket
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        _remove_socket(path)  # stale: refuse_live_socket found no one serving it
        # No plugin process runs now: every in-flight marker is a dead call's.
        InFlight(self.config.in_flight_dir).clear()
        self._socket_owned = True
        # The plugin learns the node's pid so a test's injected fault
        # (faults.point) can kill the node, not just the plugin.
        env = {**os.environ, **self.config.to_env(), NODE_PID_ENV: str(os.getpid())}
        if self._metrics is not None:
            env.update(self._metrics.plugin_env())
        self._plugin = gunicorn(path, env, self.config.log_level)
        self._plugin.start()
        plugin = self._plugin
        wait_for(lambda: os.path.exists(path) or not plugin.alive(), f"socket {path}", 30)
        if not plugin.alive():
            raise CalicnmError("the plugin process exited at start; see the log above")
        os.chmod(path, 0o600)
        _log.info("plugin listening socket=%s", path)

    def _loop(self) -> None:
        next_refresh = time.monotonic() + HOST_RECORD_REFRESH_SECONDS
        while not self._stop.wait(CHILD_POLL_SECONDS):
            try:
                if time.monotonic() >= next_refresh:
                    next_refresh = time.monotonic() + HOST_RECORD_REFRESH_SECONDS
                    if self._store is not None:
                        self._refresh_host_record(self._store)
                self._supervise_agent()
                if self._etcd is not None and not self._etcd.alive():
                    _log.error("embedded etcd died; restarting it")
                    self._etcd.stop()
                    self._etcd.start()
                if self._plugin is not None and not self._plugin.alive():
                    _log.error("plugin process died; restarting it")
                    self._plugin.stop()
                    self._start_plugin()
            except AgentDied:
                raise
            except CalicnmError as exc:
                # Keep serving: the kernel keeps its last state and the next
                # pass tries again.
                _log.warning("node pass failed: %s", exc)
            except Exception:  # the node must stay up whatever one pass hits
                _log.exception("node pass failed unexpectedly")

    def _refresh_host_record(self, store: EtcdStore) -> None:
        """Register this host again only when its stored record differs from
        what it is now (a removed record, a new AS; its address is the one
        stored, else the configured one).  The stored record is taken from
        the agent's decoded view of the cluster while that is current, so at
        idle this reads nothing from etcd and writes nothing: no revision
        that every other host's agent would have to see.  Without a current
        view it reads the one key."""
        name = self.config.hostname
        view = self._agent.decoded_view() if self._agent is not None else None
        stored: Host | None
        if view is not None:
            stored = next((h for h in view.hosts if h.name == name), None)
        else:
            try:
                stored = records.host(store, name)
            except InvalidRequest:
                stored = None  # malformed: replaced by a valid one
        ip = stored.ip if stored is not None else self.config.ip
        host = Host(name, ip, self.config.as_number)
        if stored != host and register_host(store, host):
            _log.info("host record updated name=%s ip=%s", host.name, host.ip)

    def _figures(self) -> NodeFigures:
        """What a metrics scrape reads (see ``node.metrics``)."""
        figures = NodeFigures(local_endpoints=self._agent.local_endpoints)
        status = StatusFile(self.config.agent_status_path).read()
        if status is not None and status.last_good is not None:
            figures.last_good_age = max(0.0, time.time() - status.last_good)
        if self._store is not None:
            try:
                blocks = records.blocks(self._store)
                figures.blocks = len(blocks)
                figures.allocations = sum(len(b.allocations) for b in blocks)
                for pool in records.pools(self._store):
                    used = sum(len(b.allocations) for b in blocks if b.cidr.subnet_of(pool.cidr))
                    figures.pools.append((str(pool.cidr), pool.cidr.num_addresses, used))
            except CalicnmError as exc:
                _log.debug("metrics: etcd not read: %s", exc)
        if self._bird is not None and self._bird.running():
            try:
                rows = parse_protocols(self._bird.protocols())
                states: dict[str, int] = {}
                for row in rows:
                    states[row["state"]] = states.get(row["state"], 0) + 1
                figures.bgp_sessions = states
            except CalicnmError as exc:
                _log.debug("metrics: BIRD not read: %s", exc)
        return figures

    def _shutdown(self) -> None:
        self._stop.set()
        if self._plugin is not None:
            self._plugin.stop()
        if self._agent_thread is not None:
            self._agent.wake()
            self._agent_thread.join(timeout=10)
        if self._collector_thread is not None:
            self._collector_thread.join(timeout=10)
        if self._heartbeat_thread is not None:
            self._heartbeat_thread.join(timeout=10)
        if self._heartbeat is not None and self._heartbeat.release():
            _log.info("liveness lease revoked")
        if self._socket_owned:
            _remove_socket(self.config.socket)
        if self._bird is not None and self.config.withdraws_on_exit:
            try:
                self._bird.stop()
            except CalicnmError as exc:
                _log.warning("stopping bird: %s", exc)
        if self._store is not None:
            self._store.close()
        if self._etcd is not None:
            self._etcd.stop()
        if self._lock is not None:
            self._lock.release()
        _log.info("node stopped")


def _remove_socket(path: str) -> None:
    try:
        os.unlink(path)
        _log.info("socket removed path=%s", path)
    except FileNotFoundError:
        pass
