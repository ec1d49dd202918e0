"""The one-file executable: built by scripts/build-exe.sh, run with no Python around.

The build takes a minute or two, so it is made once and cached under
``.build-cache/exe-<hash>/`` (gitignored), keyed on the hash of everything that
goes into it (gproxy/, admin_ui/, setup.cfg, the build script); a change to
any of them builds again.  The executable then runs under ``env -i`` with
PATH=/usr/bin:/bin from a temp dir, and must serve the dashboard, apply a route
through the Admin API and proxy paho clients to mosquitto, with no file of the
venv or of the building interpreter mapped into it.
"""

import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.integration.conftest import HOST, free_port, stop_process, wait_listening
from tests.integration.helpers import Paho, http_call

pytestmark = [pytest.mark.integration, pytest.mark.executable]
ROOT = pathlib.Path(__file__).resolve().parents[2]
CACHE = ROOT / ".build-cache"
INPUTS = ("gproxy", "admin_ui", "setup.cfg", "scripts/build-exe.sh")
KEY = "edd1c9f034335f136f87ad84b625c8f1"


def source_hash():
    digest = hashlib.sha256(sys.version.encode())
    for name in INPUTS:
        path = ROOT / name
        files = [path] if path.is_file() else sorted(
            p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
        for f in files:
            digest.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="session")
def executable():
    """dist/gproxy from the cache, built first if the sources changed."""
    out = CACHE / ("exe-" + source_hash())
    exe = out / "gproxy"
    if not exe.exists():
        if CACHE.exists():  # older builds: one cached executable is enough
            for old in CACHE.glob("exe-*"):
                shutil.rmtree(old, ignore_errors=True)
        build = subprocess.run(["bash", str(ROOT / "scripts" / "build-exe.sh"), str(out)],
                               cwd=ROOT, capture_output=True, text=True, timeout=1200)
        assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    return exe


def _mapped_files(pid):
    """Files mapped into ``pid`` and its children (PyInstaller runs a child)."""
    paths, todo = set(), [pid]
    while todo:
        p = todo.pop()
        try:
            with open("/proc/%d/maps" % p) as fh:
                paths |= {line.split()[-1] for line in fh if "/" in line}
            with open("/proc/%d/task/%d/children" % (p, p)) as fh:
                todo += [int(c) for c in fh.read().split()]
        except OSError:
            continue
    return paths


def admin(port, method, path, body=None):
    status, raw = http_call(port, method, path, None if body is None else json.dumps(body),
                            {"X-API-KEY": KEY})
    return status, raw.decode()


@pytest.mark.timeout(1500)
def test_the_executable_runs_with_no_python_around(executable, mosquitto, tmp_path):
    broker = mosquitto()
    port, admin_port = free_port(), free_port()
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({
        "apisix": {"stream_proxy": {"tcp": ["%s:%d" % (HOST, port)]}},
        "deployment": {"admin": {"admin_listen": {"ip": HOST, "port": admin_port}}}}))
    log = tmp_path / "gproxy.log"
    started = time.monotonic()
    with open(log, "wb") as err:
        proc = subprocess.Popen(["env", "-i", "PATH=/usr/bin:/bin", str(executable),
                                 "-c", "config.yaml", "--log-level", "info"],
                                cwd=tmp_path, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_listening(admin_port, proc, timeout=60, what="dist/gproxy")
        startup = time.monotonic() - started
        # no venv, no building interpreter: only the bundle and system libraries
        mapped = _mapped_files(proc.pid)
        assert any("_MEI" in p for p in mapped), sorted(mapped)
        foreign = [p for p in mapped if str(ROOT / ".venv") in p or p.startswith(sys.base_prefix)
                   and sys.base_prefix not in ("/usr", "/")]
        assert not foreign, foreign
        # the dashboard, from the bundle
        status, page = admin(admin_port, "GET", "/ui/")
        assert status == 200 and "<html" in page.lower()
        status, script = admin(admin_port, "GET", "/ui/static/app.js")
        assert status == 200 and "import" in script
        # a route through the Admin API, then paho clients through the proxy
        route = {"plugins": {"mqtt-proxy": {"protocol_name": "MQTT", "protocol_level": 4}},
                 "upstream": {"type": "chash", "key": "mqtt_client_id",
                              "nodes": [{"host": HOST, "port": broker.port, "weight": 1}]}}
        status, body = admin(admin_port, "PUT", "/apisix/admin/stream_routes/1", route)
        assert status == 201, body
        with Paho("exe-sub", port) as sub, Paho("exe-pub", port) as pub:
            sub.subscribe("exe", qos=1)
            pub.publish("exe", b"from the one-file build", qos=1)
            assert sub.expect_message().payload == b"from the one-file build"
        broker.wait_for_client("exe-sub")
    finally:
        assert stop_process(proc) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "mqtt client id: exe-pub" in text
    assert "Traceback" not in text, text[-3000:]
    size = os.path.getsize(executable)
    print("dist/gproxy: %.1f MB, admin port listening %.2f s after exec"
          % (size / 1e6, startup))


@pytest.mark.timeout(600)
def test_a_live_upgrade_of_the_executable_keeps_the_sessions(executable, mosquitto, tmp_path):
    """SIGUSR2 to dist/gproxy (PyInstaller's bootloader passes it on) starts the
    executable now on disk, which takes the listener and the session."""
    broker = mosquitto()
    port, admin_port = free_port(), free_port()
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({
        "apisix": {"stream_proxy": {"tcp": ["%s:%d" % (HOST, port)]}},
        "deployment": {"admin": {"admin_listen": {"ip": HOST, "port": admin_port}}}}))
    route = {"plugins": {"mqtt-proxy": {"protocol_name": "MQTT", "protocol_level": 4}},
             "upstream": {"type": "roundrobin",
                          "nodes": [{"host": HOST, "port": broker.port, "weight": 1}]}}
    log = tmp_path / "gproxy.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(["env", "-i", "PATH=/usr/bin:/bin", str(executable),
                                 "-c", "config.yaml", "--log-level", "info"],
                                cwd=tmp_path, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err)
    new = None
    try:
        wait_listening(admin_port, proc, timeout=60, what="dist/gproxy")
        assert admin(admin_port, "PUT", "/apisix/admin/stream_routes/1", route)[0] == 201
        with Paho("exe-live", port) as client:
            client.subscribe("exe/live", qos=1)
            proc.send_signal(signal.SIGUSR2)
            assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
            text = log.read_text()
            new = int(text.split("upgrade: handed 1 sessions to pid ")[1].split()[0])
            client.publish("exe/live", b"through the new executable", qos=1)
            assert client.expect_message().payload == b"through the new executable"
            assert not client.disconnected.is_set()
            assert admin(admin_port, "GET", "/ui/")[0] == 200
    finally:
        if proc.poll() is None:
            stop_process(proc)
        if new is not None:
            os.kill(new, signal.SIGTERM)
            deadline = time.monotonic() + 20
            while os.path.exists("/proc/%d" % new) and time.monotonic() < deadline:
                time.sleep(0.1)
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
