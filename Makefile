# The two commands a newcomer needs: `make run` and `make test`. Both install what they need.
SHELL := /bin/bash
PY ?= python3
SRC := $(wildcard api daemon snapshotter shim ctr tests bench hack)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Debian packages the tests drive for real (installed only when root and missing).
APT_PACKAGES := runc containerd docker-registry skopeo umoci busybox-static protobuf-compiler apache2-utils docker.io
# Installed without their Recommends: docker.io's (cgroupfs-mount, needrestart, apparmor) act on the
# host's services.
APT_NO_RECOMMENDS := docker.io
# The shims run on CPython 3.12 where the machine has one (less private memory per shim; see
# hack/shim_python.py), in a venv of their own; else on the main venv's interpreter.
SHIM_PY ?= $(shell for p in $$(pyenv root 2>/dev/null)/versions/3.12*/bin/python3.12 /usr/local/bin/python3.12 \
  /usr/bin/python3.12; do [ -x "$$p" ] && "$$p" -c "" 2>/dev/null && { echo "$$p"; break; }; done)
SHIM_VENV := .venv-shim
SHIM_STAMP := $(VENV)/.shim-installed
ROOT ?= /var/lib/pyctrd
STATE ?= /run/pyctrd
ADDRESS ?= $(STATE)/pyctrd.sock

.PHONY: setup apt run test lint typecheck layers unit proto bench-deps bench bench-quick clean

setup: $(STAMP) $(SHIM_STAMP) apt

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/python hack/devlinks.py
	touch $(STAMP)

# After the main venv: its pip install rewrites the shim script, which shim_python.py points back.
$(SHIM_STAMP): pyproject.toml $(STAMP)
	@if [ -n "$(SHIM_PY)" ]; then \
	  set -e; test -x $(SHIM_VENV)/bin/python || $(SHIM_PY) -m venv $(SHIM_VENV); \
	  $(SHIM_VENV)/bin/pip install -q -e .; \
	  $(SHIM_VENV)/bin/python hack/devlinks.py; \
	else echo "no CPython 3.12 found: the shims run on the main venv's interpreter"; fi
	$(BIN)/python hack/shim_python.py $(SHIM_VENV)
	touch $(SHIM_STAMP)

# A policy-rc.d that refuses every start (exit 101) is in place during the install, unless the
# machine has one already: the packages' services (containerd, docker) must not start on the host.
apt:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing:$$missing"; \
	    plain=""; bare=""; for p in $$missing; do \
	      case " $(APT_NO_RECOMMENDS) " in *" $$p "*) bare="$$bare $$p";; *) plain="$$plain $$p";; esac; done; \
	    if [ ! -e /usr/sbin/policy-rc.d ]; then \
	      trap 'rm -f /usr/sbin/policy-rc.d' EXIT; printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; \
	      chmod 755 /usr/sbin/policy-rc.d; fi; \
	    apt-get update -qq \
	      && { [ -z "$$plain" ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$plain >/dev/null; } \
	      && { [ -z "$$bare" ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$bare >/dev/null; }; \
	  else echo "warning: not root, missing Debian packages:$$missing (tests that need them are skipped)"; fi; \
	fi

run: setup
	$(BIN)/pyctrd --root $(ROOT) --state $(STATE) --address $(ADDRESS)

lint: setup
	$(BIN)/ruff check $(SRC)
	$(BIN)/ruff format --check $(SRC)

typecheck: setup
	$(BIN)/mypy api daemon snapshotter shim ctr

layers: setup
	$(BIN)/python hack/check_layers.py

unit: setup
	$(BIN)/pytest -q tests/unit

test: setup lint typecheck layers
	$(BIN)/pytest -q -p no:cacheprovider tests

proto: setup
	$(BIN)/python -m pyctr.api.protogen api/_pb

bench-deps: setup
	$(BIN)/pip install -q -e '.[dev,bench]'
	$(BIN)/python hack/devlinks.py
	$(BIN)/python hack/shim_python.py $(SHIM_VENV)

bench: bench-deps
	$(BIN)/python -m bench run

bench-quick: bench-deps
	$(BIN)/python -m bench run --quick

clean:
	rm -rf $(VENV) $(SHIM_VENV) build *.egg-info
