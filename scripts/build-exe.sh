#!/usr/bin/env bash
# Build dist/gproxy: gproxy as one executable file that needs no Python and no venv.
#   bash scripts/build-exe.sh [OUT_DIR]        (default OUT_DIR: dist)
# PyInstaller in one-file mode: the interpreter, gproxy, its libraries (gevent through
# the hook PyInstaller's contrib hooks ship) and the dashboard's templates and static
# files in one file that unpacks itself to a temp dir when it starts. The build deps
# (setup.cfg's `exe` extra) go into .venv, created here if needed.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-dist}")

bash scripts/apt-need.sh binutils=/usr/bin/objdump  # PyInstaller reads binaries with objdump
bash scripts/venv.sh exe

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# admin_ui and the etcd store are imported inside functions: named here so the
# analysis cannot miss them; the version shown by the dashboard needs the metadata.
.venv/bin/pyinstaller --noconfirm --clean --log-level WARN --onefile --name gproxy \
    --distpath "$out" --workpath "$work/build" --specpath "$work" \
    --add-data "$PWD/admin_ui/templates:admin_ui/templates" \
    --add-data "$PWD/admin_ui/static:admin_ui/static" \
    --hidden-import admin_ui --hidden-import gproxy.store.etcd \
    --copy-metadata gproxy \
    gproxy/__main__.py
echo "built $out/gproxy ($(du -h "$out/gproxy" | cut -f1))"
