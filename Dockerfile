# calicnm node image: the node (plugin, agent, ownership collector), BIRD and an
# embedded etcd, on a Debian 12 base.
#
# Built by `make image` (scripts/build-image.sh) with no registry and no
# network inside the build: the base calicnm/node-base:bookworm is a Debian 12
# root filesystem made by debootstrap with the packages below and loaded with
# `docker import`; calicnm's Python wheels are built on the host into
# build/wheels.  The base holds python3, python3-venv, iproute2, iptables,
# ipset, bird2, etcd-server, kmod and tini.
#
# Start it on a host with `calicnm node run --container`, which runs it as a
# privileged host-network container with the state, plugin and xtables-lock
# directories mounted (README, "Three ways to run a node").  The same image is
# the root filesystem of the managed plugin (`make plugin`).
FROM calicnm/node-base:bookworm

COPY build/wheels /tmp/wheels
RUN python3 -m venv /opt/calicnm \
 && /opt/calicnm/bin/pip install --no-index --find-links /tmp/wheels calicnm \
 && rm -rf /tmp/wheels /root/.cache \
 && ln -s /opt/calicnm/bin/calicnm /usr/local/bin/calicnm
COPY packaging/plugin/entrypoint.sh /usr/local/lib/calicnm/plugin-entrypoint

# iptables: whichever backend holds dockerd's rules, not this image's default.
ENV CALICNM_IPTABLES_BACKEND=auto
VOLUME ["/var/lib/calicnm"]
ENTRYPOINT ["calicnm"]
CMD ["node", "run"]
