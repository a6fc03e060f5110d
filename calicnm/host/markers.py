"""Files the agent writes for the other processes of its host.

- Programmed markers: one empty file ``<dir>/<endpoint id>`` per endpoint
  whose route and policy chains the agent has put in place.  The plugin's
  Join waits for its marker, so a container starts with its policy
  enforced.
- The agent's status (``AgentStatus``, one JSON file): when it last
  completed a pass, what failed, which stored records it skipped as
  invalid.  Join refuses to start a container while the agent is not
  healthy, and ``calicnm status`` shows it and turns red.

- In-flight markers (``InFlight``): one empty file ``<dir>/<id>`` per
  endpoint or network a Docker call is building or taking apart right now,
  written by the plugin.  The ownership collector leaves those ids alone,
  so it never takes apart what a slow call (etcd retrying) is still making.

The agent is the only writer of the first two, the plugin of the third.  A
file system, not etcd, because all of them live on one host, and none may
outlive the kernel state it vouches for across a datastore switch.  Endpoint
ids are checked Docker ids (``validation.check_id``) before they become file
names.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field


class Markers:
    """Files ``<dir>/<endpoint id>`` meaning "programmed"; read by Join."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def path(self, endpoint_id: str) -> str:
        return os.path.join(self.directory, endpoint_id)

    def is_set(self, endpoint_id: str) -> bool:
        return os.path.exists(self.path(endpoint_id))

    def sync(self, programmed: set[str]) -> None:
        """Make the markers exactly ``programmed``: one directory listing, then
        only the files that must come or go (an agent restarting on a host of
        1,000 endpoints writes 1,000 of them, so each is one open and close)."""
        os.makedirs(self.directory, exist_ok=True)
        present = set(os.listdir(self.directory))
        for eid in programmed - present:
            os.close(os.open(self.path(eid), os.O_WRONLY | os.O_CREAT, 0o644))
        for eid in present - programmed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path(eid))


IN_FLIGHT_MAX_SECONDS = 300.0
"""An in-flight marker older than this is what a killed call left behind, not
a call in progress (every call ends well within it: each etcd call is
bounded by the client's timeout, and Join's wait by ``JOIN_WAIT_SECONDS``)."""


class InFlight:
    """Files ``<dir>/<id>`` meaning "a Docker call is working on this id"."""

    def __init__(self, directory: str, clock: Callable[[], float] = time.time) -> None:
        self.directory = directory
        self._clock = clock

    @contextlib.contextmanager
    def held(self, ident: str) -> Iterator[None]:
        """Mark ``ident`` for the duration of the block.  The marker is
        removed however the block ends; a killed process leaves it, and it
        stops counting after ``IN_FLIGHT_MAX_SECONDS``."""
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, ident)
        with open(path, "w"):
            pass
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def clear(self) -> None:
        """Remove every marker: only while no plugin process runs (the node
        calls it before it starts one), when each is a killed call's."""
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(self.directory):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.directory, name))

    def active(self) -> frozenset[str]:
        """The ids marked less than ``IN_FLIGHT_MAX_SECONDS`` ago; leftovers
        older than that are removed."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return frozenset()
        now = self._clock()
        live = set()
        for name in names:
            path = os.path.join(self.directory, name)
            try:
                age = now - os.stat(path).st_mtime
            except FileNotFoundError:
                continue
            if age < IN_FLIGHT_MAX_SECONDS:
                live.add(name)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        return frozenset(live)


STALE_SECONDS = 10.0
"""An agent that has not written its status for this long, or whose passes
have failed for this long, is not healthy."""
BUSY_SECONDS = 120.0
"""How long one pass may run (a full resync of a large host) before the
agent counts as stuck."""


@dataclass(frozen=True)
class AgentStatus:
    """What the agent last reported.  Times are wall-clock seconds."""

    pid: int
    updated: float
    last_good: float | None = None
    busy_since: float | None = None
    last_error: str | None = None
    passes: int = 0
    invalid: dict[str, str] = field(default_factory=dict)
    datapath: str = ""
    """What carries this host's container traffic, in words (see ``Agent.datapath``)."""

    def problem(self, now: float, stale_after: float = STALE_SECONDS) -> str | None:
        """None when healthy, else why not, in words an operator can act on."""
        if self.busy_since is not None:
            if now - self.busy_since > BUSY_SECONDS:
                return f"a pass has been running for {now - self.busy_since:.0f}s"
        elif now - self.updated > stale_after:
            return f"the agent has not reported for {now - self.updated:.0f}s (is the node up?)"
        if self.last_good is None:
            return f"no pass has succeeded yet: {self.last_error or 'starting'}"
        if self.last_error is not None and now - self.last_good > stale_after:
            return (
                f"passes have failed for {now - self.last_good:.0f}s; the kernel keeps its "
                f"last state: {self.last_error}"
            )
        return None


class StatusFile:
    """The agent's status as one JSON file, replaced atomically."""

    def __init__(self, path: str) -> None:
        self.path = path

    def write(self, status: AgentStatus) -> None:
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, exist_ok=True)
        temp = f"{self.path}.{os.getpid()}.tmp"
        with open(temp, "w") as fh:
            json.dump(asdict(status), fh, sort_keys=True)
        os.replace(temp, self.path)

    def read(self) -> AgentStatus | None:
        """The last status written, or None when there is none (or it cannot
        be read: a status that cannot be read vouches for nothing)."""
        try:
            with open(self.path) as fh:
                data = json.load(fh)
            return AgentStatus(**data)
        except (OSError, ValueError, TypeError):
            return None

    def problem(self, now: float, stale_after: float = STALE_SECONDS) -> str | None:
        status = self.read()
        if status is None:
            return "the agent has not reported yet (is the node up?)"
        return status.problem(now, stale_after)
