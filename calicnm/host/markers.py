"""Files the agent writes for the other processes of its host.

- Programmed markers: one empty file ``<dir>/<endpoint id>`` per endpoint
  whose route and policy chains the agent has put in place.  The plugin's
  Join waits for its marker, so a container starts with its policy
  enforced.
- The agent's status (``AgentStatus``, one JSON file): when it last
  completed a pass, what failed, which stored records it skipped as
  invalid.  Join refuses to start a container while the agent is not
  healthy, and ``calicnm status`` shows it and turns red.

The agent is the only writer of both.  A file system, not etcd, because
all of them live on one host, and neither may outlive the kernel state it
vouches for across a datastore switch.  Endpoint ids are checked Docker ids
(``validation.check_id``) before they become file names.
"""

from __future__ import annotations

import contextlib
import json
import os
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
        os.makedirs(self.directory, exist_ok=True)
        present = set(os.listdir(self.directory))
        for eid in programmed - present:
            with open(self.path(eid), "w"):
                pass
        for eid in present - programmed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path(eid))


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
