#!/usr/bin/env bash
# Set up .venv (scripts/venv.sh) and run gproxy with the given arguments, from the
# current directory (so -c paths are yours; with no -c, ./conf/config.yaml if present).
#   bash scripts/run.sh [gproxy args...]    e.g. -c conf/config.yaml, --workers 2
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/venv.sh" >&2
exec "$root/.venv/bin/gproxy" "$@"
