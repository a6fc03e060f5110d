"""Programmed markers: one empty file ``<dir>/<endpoint id>`` per endpoint
whose route and policy chains the agent has put in place.

The agent is the only writer (``sync``); the plugin's Join reads them
(``is_set``) to wait until a container's policy is enforced.  A file
system, not etcd, because both live on the same host and a marker must
never outlive the kernel state it vouches for across a datastore switch.
"""

from __future__ import annotations

import contextlib
import os


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
