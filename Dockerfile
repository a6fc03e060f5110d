# calicnm node image: the plugin, the node supervisor and an embedded etcd.
#
# Run it on each host with the host's network and the plugin directory:
#   docker run -d --name calicnm --net=host --pid=host --privileged \
#     -v /run/docker/plugins:/run/docker/plugins \
#     -v /var/run/docker.sock:/var/run/docker.sock \
#     -v /var/lib/calicnm:/var/lib/calicnm \
#     -e ETCD_ENDPOINTS=http://<etcd>:2379 calicnm:latest
# (Docker cannot start its own network plugin's container at boot; most
# operators run `calicnm node run` from systemd instead, before docker.service.)
FROM debian:bookworm-slim

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv iproute2 iptables ipset bird2 etcd-server ca-certificates \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/calicnm
COPY pyproject.toml README.md ./
COPY calicnm ./calicnm
RUN python3 -m venv /opt/calicnm/venv \
 && /opt/calicnm/venv/bin/pip install --no-cache-dir . \
 && ln -s /opt/calicnm/venv/bin/calicnm /usr/local/bin/calicnm

VOLUME ["/var/lib/calicnm"]
ENTRYPOINT ["calicnm"]
CMD ["node", "run"]
