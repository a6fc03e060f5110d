"""What an operator's service manager does to a running host: ``systemctl restart
docker`` and ``systemctl restart calicnm``.  ``--restart always`` containers on a
calicnm network come back, or stay, reachable at their addresses, and nothing is
orphaned.  (A simulated reboot is in ``test_lost_undo_calls``.)"""

from __future__ import annotations

from pathlib import Path

from lab.cluster import single_host, wait_until
from tests.e2e.helpers import http_ok
from tests.e2e.test_lost_undo_calls import WEB_IP, assert_settled, check, start_workload


def test_docker_and_node_restarts_keep_restart_always_containers(tmp_path: Path) -> None:
    with single_host(tmp_path) as host:
        start_workload(host)
        host.docker("rm", "-f", "once")

        host.dockerd.stop_daemon()  # systemctl restart docker
        host.dockerd.start_daemon()
        assert_settled(host)  # web back at its --ip; worker back at some address
        worker_ip = host.ip_of("worker", "net")

        host.stop_node()  # systemctl restart calicnm: SIGTERM, then a new node
        host.start_node()
        assert http_ok(host, "net", WEB_IP)  # the containers never stopped
        assert host.ip_of("worker", "net") == worker_ip
        wait_until(lambda: check(host)["ok"] is True, 30, "nothing orphaned after the restart")
        assert_settled(host)
