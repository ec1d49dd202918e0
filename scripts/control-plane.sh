#!/usr/bin/env bash
# The control-plane benchmark (scripts/control_plane.py): how long gproxy's hub is
# held while its tables grow and hostile input arrives, with sessions relaying.
# Installs what it needs on a fresh Debian machine, then runs it.
#   bash scripts/control-plane.sh --quick   # 500 sessions, 1,000 + 1,000 objects: what CI runs
#   bash scripts/control-plane.sh           # full: 5,000 sessions, 10,000 + 10,000 objects
# Debian packages: mosquitto (the brokers), etcd-server and etcd-client (the etcd
# phase, as the etcd tests run it). Python packages go into .venv, created here.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/apt-need.sh mosquitto=/usr/sbin/mosquitto etcd-server=/usr/bin/etcd \
    etcd-client=/usr/bin/etcdctl

bash scripts/venv.sh test  # the etcd launcher is the etcd tests' (tests/integration/etcd.py)

export PATH="$PATH:/usr/sbin"
exec .venv/bin/python scripts/control_plane.py "$@"
