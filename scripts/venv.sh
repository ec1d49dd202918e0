#!/usr/bin/env bash
# Create .venv if it is missing and pip-install gproxy (editable) with the given extras.
#   bash scripts/venv.sh [EXTRAS]        (e.g. test, exe, bench; none: gproxy alone)
# Debian's own python3 creates venvs only with ensurepip, which it ships apart in
# python3-venv: installed here when this python3's stdlib lacks it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    bash scripts/apt-need.sh "python3-venv=$(python3 -c \
        'import sysconfig; print(sysconfig.get_path("stdlib"))')/ensurepip"
    python3 -m venv .venv
fi
# Editable: source changes need no reinstall, only setup.cfg's do (a stamp per extra).
stamp=".venv/.installed-${1:-base}-$(sha1sum setup.cfg | cut -c1-12)"
[ -e "$stamp" ] && exit 0
.venv/bin/pip install -q --disable-pip-version-check -e ".${1:+[$1]}"
touch "$stamp"
