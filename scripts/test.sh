#!/usr/bin/env bash
# Install everything the test suite needs on a fresh Debian machine, then run it.
#   bash scripts/test.sh [pytest args...]
# Debian packages: mosquitto (brokers for the integration tests), chromium (the
# dashboard's browser tests). Python packages go into .venv, created here.
set -euo pipefail
cd "$(dirname "$0")/.."

# mosquitto: brokers for the integration tests; chromium: the dashboard's browser tests;
# etcd-server and etcd-client (etcdctl): the etcd store's tests; binutils (objdump):
# PyInstaller, for the one-file executable's tests; dnsmasq-base (dnsmasq without its
# system service): the DNS server of the DNS discovery tests; curl: the plugin doc's
# commands, run verbatim.
bash scripts/apt-need.sh mosquitto=/usr/sbin/mosquitto \
    mosquitto-clients=/usr/bin/mosquitto_sub chromium=/usr/bin/chromium \
    etcd-server=/usr/bin/etcd etcd-client=/usr/bin/etcdctl binutils=/usr/bin/objdump \
    dnsmasq-base=/usr/sbin/dnsmasq curl=/usr/bin/curl

bash scripts/venv.sh test

export PATH="$PATH:/usr/sbin"
# The package layout's import contracts (setup.cfg [importlinter]) first: a broken
# contract fails the run before any test does.
.venv/bin/lint-imports --no-cache
exec .venv/bin/python -m pytest "$@"
