#!/usr/bin/env bash
# Install what the benchmark needs on a fresh Debian machine, then run it.
#   bash scripts/bench.sh --quick        # ~3 minutes, what CI runs
#   bash scripts/bench.sh                # full: 3 rounds, 10k idle connections
# Debian packages: mosquitto, haproxy, nginx-light + libnginx-mod-stream (the
# comparison targets). Python packages go into .venv, created here.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/apt-need.sh mosquitto=/usr/sbin/mosquitto haproxy=/usr/sbin/haproxy \
    nginx-light=/usr/sbin/nginx libnginx-mod-stream=/usr/lib/nginx/modules/ngx_stream_module.so

bash scripts/venv.sh bench  # trustme: the TLS workloads' certificates

export PATH="$PATH:/usr/sbin"
exec .venv/bin/python -m bench "$@"
