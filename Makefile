# calicnm: `make run` starts a node on this host; `make test` runs the whole suite.
# Both install what is missing first (Debian packages, then a virtualenv).

VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTHON ?= python3

.PHONY: deps run test unit lint bench soak scale install-systemd image plugin clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,bench]'
	touch $(STAMP)

# The same-host fast path's tc program, built from source with Debian's clang.
BPF_OBJ := calicnm/bpf/fastpath.bpf.o
$(BPF_OBJ): calicnm/bpf/fastpath.bpf.c
	clang -O2 -g -Wall -Werror --target=bpf -I/usr/include/$$(uname -m)-linux-gnu -c $< -o $@

deps:
	sh scripts/install-deps.sh
	$(MAKE) --no-print-directory $(STAMP) $(BPF_OBJ)
	ln -sf $(CURDIR)/$(VENV)/bin/calicnm /usr/local/bin/calicnm

# A calicnm node in the foreground, with an embedded etcd unless
# ETCD_ENDPOINTS is set, ready for `docker network create -d calicnm ...`.
run: deps
	sh scripts/ensure-dockerd.sh
	$(VENV)/bin/calicnm node run

lint: deps
	$(VENV)/bin/ruff check calicnm lab tests bench
	$(VENV)/bin/ruff format --check calicnm lab bench tests
	$(VENV)/bin/mypy

# The tiers run in TEST_WORKERS processes (pytest-xdist), one test file per worker at a
# time: every file builds its own namespaces, dockerds and etcds, and most of an e2e
# test's time is spent waiting on them, not on the CPU.
TEST_WORKERS ?= 3
test: lint
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

# Unit tests only: no root, nothing installed outside .venv, a few seconds.
unit: $(STAMP)
	$(PY) -m pytest tests/unit

# Data plane (qperf) and control plane benchmarks; report, table and charts in
# bench/results/<UTC time>/.  Prints figures; never fails on a number.
bench: deps
	$(PY) -m pip install -q --disable-pip-version-check -e '.[bench]'
	out=bench/results/$$(date -u +%Y%m%dT%H%M%SZ); \
	$(PY) -m bench.dataplane --out $$out && $(PY) -m bench.controlplane --out $$out && \
	echo "report: $$out"

# Container start/stop cycles on 3 emulated hosts under injected faults (node kill -9,
# dockerd and etcd restarts), then leaks by kind and the idle cost; report in
# bench/results/<UTC time>/soak.md.  SOAK_MINUTES sets the length.
SOAK_MINUTES ?= 30
soak: deps
	$(PY) -m bench.soak --minutes $(SOAK_MINUTES) --fault-every 30 \
		--out bench/results/$$(date -u +%Y%m%dT%H%M%SZ)-soak

# A simulated cluster of N = 10, 25 and 50 docker-less hosts (real nodes and BIRD in
# namespaces, one etcd), full mesh and route reflector: etcd and agent cost at idle and
# per change, convergence times, memory; then the agent's calculation per change against
# cluster size (to 100,000 endpoints), and policy at size on one host (qperf with 10,000
# endpoints of policy, memory at 1,000 and 10,000 local endpoints, full resync).  Reports
# and charts in bench/results/<UTC time>-scale/ (about 45 min).  Prints figures; never
# fails on a number.
scale: deps
	out=bench/results/$$(date -u +%Y%m%dT%H%M%SZ)-scale; \
	$(PY) -m bench.scale --out $$out && $(PY) -m bench.agent_cost --out $$out && \
	$(PY) -m bench.policy_at_size --out $$out && echo "report: $$out"

# systemd units for the node and a route reflector, and an example settings file
# (kept if one exists).  DESTDIR installs under another root (for packaging).
SYSTEMD_DIR ?= /etc/systemd/system
CONFIG_DIR  ?= /etc/calicnm
install-systemd:
	install -D -m 0644 packaging/systemd/calicnm.service $(DESTDIR)$(SYSTEMD_DIR)/calicnm.service
	install -D -m 0644 packaging/systemd/calicnm-route-reflector.service \
		$(DESTDIR)$(SYSTEMD_DIR)/calicnm-route-reflector.service
	test -e $(DESTDIR)$(CONFIG_DIR)/calicnm.env || \
		install -D -m 0600 packaging/systemd/calicnm.env.example $(DESTDIR)$(CONFIG_DIR)/calicnm.env
	if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi

# The node image, built with no registry: a debootstrap base loaded with
# `docker import`, then the Dockerfile (scripts/build-image.sh says how).
IMAGE ?= calicnm/node:latest
image: deps
	sh scripts/ensure-dockerd.sh
	PYTHON=$(PY) sh scripts/build-image.sh $(IMAGE)

# The managed (v2) plugin directory build/plugin: plugin.json as config.json and
# the node image's file system as rootfs.  Then `docker plugin create
# calicnm/calicnm build/plugin` (README, "The managed plugin").
plugin: image
	IMAGE=$(IMAGE) sh scripts/build-plugin.sh build/plugin

clean:
	rm -rf build $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache
