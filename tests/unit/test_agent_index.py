"""The incremental agent equals a full compile, whatever happened in between.

A state machine writes random records (profiles with tags and tag rules,
networks, endpoints on three hosts with their network's or their own
profiles, hosts, pools, affinities, BGP settings, invalid values and stray
keys), deletes and re-creates them, breaks the change stream, compacts the
history and restarts the stream.  At random points the agent makes a pass,
applying only the deltas its copy received (or reading the store when the
copy is not current).  After each pass:

- its index equals a fresh read (``read_snapshot``) and its tag members
  equal ``tag_members`` computed from scratch;
- the kernel it programmed (chains of both tables, ipsets, routes, markers)
  equals what a new agent programs from a fresh read in a fresh kernel.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import tempfile

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from calicnm.agent_index import AgentIndex
from calicnm.endpoint import derive_mac, plan_link
from calicnm.errors import DatastoreUnavailable
from calicnm.host.markers import Markers
from calicnm.host.policy_applier import PolicyApplier
from calicnm.model import Endpoint, Network, Pool
from calicnm.node.agent import Agent
from calicnm.policy import Profile, Rule
from calicnm.profiles import tag_members
from calicnm.store import keys
from calicnm.store.kv import KV, Txn
from calicnm.store.records import Snapshot, agent_kvs, read_snapshot
from tests.fakes import FakeIpsets, FakeIptables, FakeRoutes, MemoryStore

HOSTS = ["h1", "h2", "h3"]
NETS = ["a" * 64, "b" * 64, "c" * 64]
EIDS = [c * 64 for c in "0123456789"]
PROFILES = ["web", "db", "dataman", "ops"]
TAGS = ["web", "db", "admin", "dataman"]

profile_values = st.one_of(
    st.just("{not json"),
    st.builds(
        lambda tags, sources, deny: (tags, sources, deny),
        st.lists(st.sampled_from(TAGS), max_size=2, unique=True),
        st.lists(st.sampled_from(TAGS), max_size=2),
        st.booleans(),
    ),
)
records = st.one_of(
    st.tuples(st.just("profile"), st.sampled_from(PROFILES), profile_values),
    st.tuples(
        st.just("network"),
        st.integers(0, 2),
        st.tuples(st.sampled_from([None, *PROFILES]), st.sampled_from([None, *PROFILES])),
    ),
    st.tuples(
        st.just("endpoint"),
        st.integers(0, 9),
        st.tuples(
            st.sampled_from(HOSTS),
            st.integers(0, 2),
            st.integers(1, 4),
            st.one_of(st.none(), st.lists(st.sampled_from(PROFILES), max_size=2, unique=True)),
        ),
    ),
    st.tuples(st.just("host"), st.sampled_from(HOSTS), st.integers(0, 3)),
    st.tuples(st.just("pool"), st.integers(0, 1), st.booleans()),
    st.tuples(st.just("affinity"), st.sampled_from(HOSTS), st.integers(0, 3)),
    st.tuples(st.just("bgp"), st.just(""), st.integers(0, 2)),
    st.tuples(st.just("stray"), st.sampled_from(["hosts", "profiles", "pools"]), st.just(0)),
)


def record_kv(record: tuple[str, object, object]) -> tuple[str, str]:
    kind, name, value = record
    if kind == "profile":
        assert isinstance(name, str)
        if isinstance(value, str):
            return keys.profile(name), value
        assert isinstance(value, tuple)
        tags, sources, deny = value
        inbound = tuple(Rule("deny" if deny else "allow", {"src_tag": t}) for t in sources)
        profile = Profile(name, tuple(tags), inbound, (Rule("allow"),))
        return keys.profile(name), profile.to_json()
    if kind == "network":
        assert isinstance(name, int) and isinstance(value, tuple)
        docker_name, profile_name = value
        net = Network(NETS[name], docker_name=docker_name, profile=profile_name)
        return keys.network(NETS[name]), net.to_json()
    if kind == "endpoint":
        assert isinstance(name, int) and isinstance(value, tuple)
        host, net, n, profiles = value
        eid = EIDS[name]
        ip = ipaddress.IPv4Address(f"10.{n}.0.{name + 1}")
        plan = plan_link(eid, derive_mac(eid), (ip,))
        ep = Endpoint(
            eid,
            host,
            NETS[net],
            plan.host_if,
            plan.peer_if,
            plan.mac,
            (ip,),
            profiles=None if profiles is None else tuple(profiles),
        )
        return keys.endpoint(host, eid), ep.to_json()
    if kind == "host":
        return keys.host_meta(str(name)), (
            f'{{"name": "{name}", "ip": "198.18.0.{value}", "as_num": null}}'
            if value
            else '{"name": 3}'
        )
    if kind == "pool":
        cidr = ipaddress.IPv4Network(f"10.{name}.0.0/16")
        return keys.pool(cidr), Pool(cidr, nat_outgoing=bool(value)).to_json()
    if kind == "affinity":
        return keys.affinity(str(name), f"10.0.{value}.0/26"), "{}"
    if kind == "bgp":
        values = ['{"as_num": 64512}', '{"node_mesh": false}', "not json"]
        assert isinstance(value, int)
        return keys.BGP_CONFIG, values[value]
    return f"{keys.ROOT}/{name}/odd/key/shape", "x"


def as_kv(key: str, value: str) -> KV:
    return KV(key, value, 1)


def endpoint_key(index: int) -> list[str]:
    return [keys.endpoint(h, EIDS[index]) for h in HOSTS]


def normal(snapshot: Snapshot) -> Snapshot:
    """Order-free form (``endpoints`` carries no order)."""
    return Snapshot(
        snapshot.profiles,
        snapshot.networks,
        {h: sorted(eps, key=lambda e: e.id) for h, eps in sorted(snapshot.by_host.items())},
        sorted(snapshot.hosts, key=lambda h: h.name),
        sorted(snapshot.pools, key=lambda p: p.cidr),
        {h: sorted(b) for h, b in snapshot.affinity.items()},
        snapshot.bgp,
        snapshot.global_peers,
        snapshot.node_peers,
        snapshot.invalid,
    )


class Kernel:
    """A fake kernel and an agent on host h1 programming it."""

    def __init__(self, store: MemoryStore, marker_dir: str) -> None:
        self.iptables = FakeIptables()
        self.ipsets = FakeIpsets(self.iptables)
        self.routes = FakeRoutes()
        for eid in EIDS:
            self.routes.add_link(plan_link(eid, derive_mac(eid), ()).host_if)
        self.marker_dir = marker_dir
        self.agent = Agent(
            store,
            "h1",
            PolicyApplier(self.iptables, self.ipsets),
            self.routes,
            Markers(marker_dir),
        )

    def state(self, local: set[str]) -> object:
        """The kernel as policy sees it; routes to the ``local`` endpoints'
        addresses only (a deleted endpoint's route goes with its veth, which
        the plugin removes, not the agent)."""
        sets = {name: self.ipsets.members(name) for name in self.ipsets.sets}
        marked = sorted(os.listdir(self.marker_dir)) if os.path.isdir(self.marker_dir) else []
        routes = {dst: dev for dst, dev in self.routes.routes.items() if dst in local}
        return (
            self.iptables.save("filter"),
            self.iptables.save("nat"),
            sets,
            routes,
            marked,
        )


class IncrementalMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="calicnm-index-")
        self.store = MemoryStore()
        self.kernel = Kernel(self.store, os.path.join(self.tmp, "incremental"))
        self.fresh_runs = 0

    def teardown(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    @rule(record=records)
    def put(self, record: tuple[str, object, object]) -> None:
        self.store.put(*record_kv(record))

    @rule(record=records)
    def delete(self, record: tuple[str, object, object]) -> None:
        self.store.delete(record_kv(record)[0])

    @rule(index=st.integers(0, 9))
    def delete_endpoint(self, index: int) -> None:
        for key in endpoint_key(index):
            self.store.delete(key)

    @rule(puts=st.lists(records, max_size=4), deletes=st.lists(records, max_size=3))
    def transaction(self, puts: list, deletes: list) -> None:  # type: ignore[type-arg]
        written = dict(record_kv(r) for r in puts)
        removed = {record_kv(r)[0] for r in deletes} - set(written)
        self.store.commit(Txn(puts=list(written.items()), deletes=sorted(removed)))

    @rule()
    def stream_breaks(self) -> None:
        self.store.down = True
        self.store.down = False

    @rule(everything=st.booleans())
    def compaction(self, everything: bool) -> None:
        self.store.compact(None if everything else max(0, self.store.list_at("")[1] - 2))

    @rule(follow=st.booleans(), full=st.booleans())
    def agent_pass(self, follow: bool, full: bool) -> None:
        """A pass: with the stream followed (started, resumed or reloaded as
        the agent's loop does) or without it (the copy not current: a read)."""
        if follow:
            self.kernel.agent.follow(self.store)
        self.kernel.agent.reconcile(full=full)
        self.check_after_pass()

    @precondition(lambda self: self.kernel.agent._mirror is not None)
    @rule()
    def pass_while_etcd_down(self) -> None:
        self.store.down = True
        try:
            self.kernel.agent.reconcile()
        except DatastoreUnavailable:
            pass
        finally:
            self.store.down = False

    def check_after_pass(self) -> None:
        index = self.kernel.agent._index
        fresh = read_snapshot(self.store)
        assert normal(index.snapshot()) == normal(fresh)
        every = [(index.effective(e), tuple(str(ip) for ip in e.ipv4)) for e in fresh.endpoints]
        valid = {n: p for n, p in fresh.profiles.items() if p is not None}
        want = {t: frozenset(ips) for t, ips in tag_members(valid, every).items() if ips}
        assert index.members() == want
        assert index.consistent()
        self.fresh_runs += 1
        other = Kernel(self.store, os.path.join(self.tmp, f"fresh{self.fresh_runs}"))
        other.agent.first_pass()
        local = {f"{ip}/32" for e in fresh.endpoints if e.host == "h1" for ip in e.ipv4}
        assert self.kernel.state(local) == other.state(local)

    @invariant()
    def index_holds_only_the_agents_input(self) -> None:
        index = self.kernel.agent._index
        stored = {kv.key for kv in agent_kvs(self.store)}
        assert set(index._records) <= stored | set(index._records)


TestIncrementalAgent = IncrementalMachine.TestCase
TestIncrementalAgent.settings = settings(
    max_examples=100,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_a_delta_decodes_only_what_changed() -> None:
    """A change to one endpoint decodes one record, whatever the cluster holds."""
    index = AgentIndex()
    kvs = [as_kv(*record_kv(("endpoint", i, ("h2", 0, 1, None)))) for i in range(10)]
    kvs.append(as_kv(*record_kv(("network", 0, ("web", None)))))
    kvs.append(as_kv(*record_kv(("profile", "web", (["web"], ["web"], False)))))
    index.reset(kvs)
    assert index.decoded == 12
    before = index.members()["web"]
    key, value = record_kv(("endpoint", 3, ("h2", 0, 2, None)))
    index.apply({key: as_kv(key, value)})
    assert index.decoded == 13
    assert index.members()["web"] != before
    index.reset(kvs)  # values unchanged but one: one more decode
    assert index.decoded == 14


def test_an_unchanged_tag_keeps_its_set_object() -> None:
    """The applier compares sets by identity first: untouched tags stay the same object."""
    index = AgentIndex()
    web = record_kv(("profile", "web", (["web"], [], False)))
    db = record_kv(("profile", "db", (["db"], [], False)))
    eps = [
        record_kv(("endpoint", i, ("h2", 0, 1, ["web"] if i < 5 else ["db"]))) for i in range(10)
    ]
    index.reset(as_kv(k, v) for k, v in [web, db, *eps])
    first = index.members()
    web_set, db_set = first["web"], first["db"]
    key, value = record_kv(("endpoint", 7, ("h3", 0, 1, ["db"])))  # moved, same address
    index.apply({eps[7][0]: None, key: as_kv(key, value)})
    assert index.members()["db"] is db_set
    key, value = record_kv(("endpoint", 8, ("h2", 0, 2, ["db"])))  # a new address
    index.apply({key: as_kv(key, value)})
    after = index.members()
    assert after["web"] is web_set
    assert after["db"] != db_set
