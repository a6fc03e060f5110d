#!/bin/sh
# Make sure a Docker daemon answers on /var/run/docker.sock: start docker.service
# where systemd runs, otherwise start dockerd in the background (log in
# /var/log/calicnm-dockerd.log).  Waits at most 60 s.
set -eu

DOCKER=/usr/bin/docker
if $DOCKER info >/dev/null 2>&1; then
    exit 0
fi
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    systemctl start docker
else
    echo "starting dockerd (log: /var/log/calicnm-dockerd.log)"
    nohup dockerd >>/var/log/calicnm-dockerd.log 2>&1 &
fi
i=0
while [ $i -lt 120 ]; do
    if $DOCKER info >/dev/null 2>&1; then
        exit 0
    fi
    sleep 0.5
    i=$((i + 1))
done
echo "dockerd did not come up; see /var/log/calicnm-dockerd.log" >&2
exit 1
