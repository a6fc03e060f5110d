"""A calicnm agent in a process of its own, for kernel tests that run it inside a
throwaway namespace (``nsenter``) together with the etcd it follows, so that
every socket it opens, gRPC's included, lives in that namespace.

    python -m tests.kernel.agent_process --etcd URL --state DIR [--once]

It follows etcd (``Agent.run(stop, store)``, the store as its change source)
after a first pass, and writes its figures (``full_reads``, ``passes``,
``last_error``) to ``DIR/figures.json`` about every 0.1 s until SIGTERM.  With
``--once`` it is a fresh agent that makes one full pass and exits.  It uses
only the agent's public face: ``Agent(...)``, ``first_pass``, ``reconcile``,
``run``, ``full_reads``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
from pathlib import Path
from types import FrameType

from calicnm.host.ipsets import Ipsets
from calicnm.host.iptables import Iptables
from calicnm.host.markers import Markers
from calicnm.host.netlink import HostPlumbing
from calicnm.host.policy_applier import PolicyApplier
from calicnm.node.agent import Agent
from calicnm.store.etcd import EtcdStore, parse_endpoints


def write_figures(path: Path, agent: Agent) -> None:
    figures = {
        "full_reads": agent.full_reads,
        "passes": getattr(agent, "passes", None),
        "last_error": getattr(agent, "last_error", None),
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(figures))
    os.replace(tmp, path)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--etcd", required=True)
    parser.add_argument("--state", required=True)
    parser.add_argument("--host", default="h1")
    parser.add_argument("--once", action="store_true")
    args = parser.parse_args()
    state = Path(args.state)
    state.mkdir(parents=True, exist_ok=True)
    figures = state / "figures.json"
    store = EtcdStore(parse_endpoints(args.etcd), timeout=2.0)
    agent = Agent(
        store,
        args.host,
        PolicyApplier(Iptables(), Ipsets()),
        HostPlumbing(),
        Markers(str(state / "programmed")),
        resync=3600.0,  # no periodic full pass: a full read here is a recovery
    )
    try:
        if args.once:
            agent.reconcile(full=True)
            write_figures(figures, agent)
            return 0
        stop = threading.Event()

        def on_signal(_signum: int, _frame: FrameType | None) -> None:
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        agent.first_pass()
        thread = threading.Thread(target=agent.run, args=(stop, store), daemon=True)
        thread.start()
        while not stop.wait(0.1):
            write_figures(figures, agent)
        agent.wake()
        thread.join(timeout=30)
        return 0
    finally:
        store.close()


if __name__ == "__main__":
    raise SystemExit(main())
