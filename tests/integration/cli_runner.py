"""Running the real ``calicnm`` command against a test etcd."""

from __future__ import annotations

import os
import subprocess

from lab.paths import VENV_BIN


def run(url: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """The real calicnm command against ``url``, with a clean environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ETCD", "CALICNM"))}
    env.update(ETCD_ENDPOINTS=url, CALICNM_HOSTNAME="cli-host")
    return subprocess.run(
        [os.path.join(VENV_BIN, "calicnm"), *args],
        capture_output=True,
        text=True,
        env=env,
        input=stdin,
        timeout=60,
    )
