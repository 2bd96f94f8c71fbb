# Tandem — two commands on a fresh Debian machine: `make demo` and `make test`.
# Each target installs what is missing (apt packages, the .venv, the build) first.

PYTHON_SYS ?= $(shell command -v python3.11 || command -v python3)
VENV       := .venv
PY         := $(VENV)/bin/python
PIP        := $(VENV)/bin/pip
# Debian packages the project needs: compiler for the Cython core, etcd 3.4, ClickHouse 18.16, ip netns.
APT_PACKAGES := gcc iproute2 etcd-server etcd-client clickhouse-server clickhouse-client prometheus tmux
PYTEST_ARGS ?=

.PHONY: all deps build demo test bench clean deploy-deps deploy-test lint-ansible wheelhouse

all: build

# Install only the Debian packages that are missing (apt-get update once, if needed).
.deps.stamp: Makefile
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi
	@touch $@

$(VENV)/.installed: .deps.stamp pyproject.toml setup.py
	test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q Cython grpcio-tools
	$(PIP) install -q -e '.[dev,embedded,capacity]'
	@touch $@

deps: $(VENV)/.installed

# Compile the Cython core and generate the gRPC stubs in place (cheap when up to date).
build: $(VENV)/.installed
	$(PY) setup.py -q build_ext --inplace

demo: build
	$(VENV)/bin/tandem demo

# The deploy test's base image (debootstrap: mostly download and unpack) is built in the
# background while the first tests run; tests/test_deploy_ansible.py waits for it (a lock).
test: build deploy-deps
	$(PY) tests/deploy_harness.py --image-only > .deploy-image.log 2>&1 &
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The Ansible side (ansible/): podman with runc and debootstrap for the deploy test's hosts,
# and the controller's pinned ansible-core and ansible-lint in a venv of their own.
DEPLOY_APT := podman runc debootstrap openssh-client
DEPLOY_VENV := .venv-deploy
.deploy-deps.stamp: Makefile
	@missing=""; for p in $(DEPLOY_APT); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi
	@touch $@

$(DEPLOY_VENV)/.installed: .deploy-deps.stamp ansible/requirements.txt
	test -x $(DEPLOY_VENV)/bin/python || $(PYTHON_SYS) -m venv $(DEPLOY_VENV)
	$(DEPLOY_VENV)/bin/pip install -q --upgrade pip
	$(DEPLOY_VENV)/bin/pip install -q -r ansible/requirements.txt
	@touch $@

deploy-deps: $(DEPLOY_VENV)/.installed

# The roles deployed onto containers with systemd (tests/deploy_harness.py); one JSON line.
deploy-test: build deploy-deps
	$(PY) tests/deploy_harness.py --json

lint-ansible: deploy-deps
	cd ansible && LC_ALL=C.UTF-8 PATH=$(CURDIR)/$(DEPLOY_VENV)/bin:$$PATH ansible-lint --profile production .

# The nodes' wheelhouse for ansible/inventories/example (tandem_node_wheelhouse).
wheelhouse: build
	rm -rf dist/wheelhouse
	$(PIP) wheel -q --no-deps --no-build-isolation -w dist/wheelhouse .
	$(PIP) wheel -q -w dist/wheelhouse dist/wheelhouse/tandem_router-*.whl

bench: build
	$(PY) bench/queue_core.py --json
	$(PY) bench/journal.py --json
	$(PY) bench/route.py --json
	$(PY) bench/route.py --tls --json
	$(PY) bench/failover.py --json
	$(PY) bench/overflow.py --json
	$(PY) bench/history.py --json
	$(PY) bench/ewt.py --json
	$(PY) bench/forecast.py --json
	$(PY) bench/simulate.py --json
	$(PY) bench/whatif.py --json
	$(PY) bench/rebalance.py --json

clean:
	rm -rf build router/*.so router/_queue_core.c router/v1/*_pb2*.py router/v1/*_pb2*.pyi .deps.stamp $(VENV) \
	  .deploy-deps.stamp $(DEPLOY_VENV) dist
