#!/usr/bin/env bash
# Install the Debian packages that are missing, with one apt-get update.
#   bash scripts/apt-need.sh PACKAGE=PATH ...   (PATH: a file the package provides)
set -euo pipefail
need=()
for pair in "$@"; do
    pkg=${pair%%=*}
    path=${pair#*=}
    [ -e "$path" ] || need+=("$pkg")
done
[ ${#need[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing Debian packages: ${need[*]}"
$sudo apt-get update -q
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "${need[@]}"
