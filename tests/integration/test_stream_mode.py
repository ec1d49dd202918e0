"""Stream mode off, as in APISIX, in a real gproxy process (docs/apisix-behaviour.md §6-7).

A config file without ``apisix.stream_proxy`` (APISIX <= 3.4's switch) or with
``proxy_mode: http`` (3.5+) binds no stream listener at all: the process's
only listening socket is the Admin API's (the control API and metrics are
turned off here), and every method on
``/apisix/admin/stream_routes`` answers 400.  Which sockets the process
listens on is read from ``/proc`` (its descriptors' inodes against
``/proc/net/tcp{,6}``), so a port some other process holds cannot confuse the
check; a positive control shows the check sees a stream listener when there
is one.
"""

import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.integration.conftest import (HOST, free_port, mqtt_route, node, stop_process,
                                        wait_listening)
from tests.integration.helpers import http_call

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

KEY = "edd1c9f034335f136f87ad84b625c8f1"
STREAM_OFF = {"error_msg": "stream mode is disabled, can not add stream routes"}


def listening_ports(pid):
    """The TCP ports process ``pid`` listens on (from its descriptors and /proc/net)."""
    inodes = set()
    fd_dir = "/proc/%d/fd" % pid
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(os.path.join(fd_dir, fd))
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as fh:
            for line in fh.read().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # LISTEN, ours
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def admin(port, method, path, body=None):
    status, raw = http_call(port, method, path, None if body is None else json.dumps(body),
                            {"X-API-KEY": KEY})
    return status, json.loads(raw)


@pytest.fixture
def start(tmp_path):
    procs = []

    def run(apisix_section):
        directory = tmp_path / ("run%d" % len(procs))
        directory.mkdir()
        admin_port = free_port()
        # the control API and the metrics listen by default: off here, so the Admin
        # API's is the one listener left to see (an apisix section with only this
        # switch still has no stream_proxy)
        cfg = {"deployment": {"admin": {"admin_listen": {"ip": HOST, "port": admin_port}}},
               "plugin_attr": {"prometheus": {"enable_export_server": False}},
               "apisix": dict(apisix_section or {}, enable_control=False)}
        (directory / "config.yaml").write_text(yaml.safe_dump(cfg))
        log = open(directory / "gproxy.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "gproxy", "-c", "config.yaml",
                                 "--log-level", "info"], cwd=str(directory), stdout=log,
                                stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        procs.append(proc)
        wait_listening(admin_port, proc, timeout=15, what="gproxy admin")
        return proc, admin_port, directory / "gproxy.log"

    yield run
    for proc in procs:
        stop_process(proc)


@pytest.mark.parametrize("apisix_section", [
    None,                                                        # APISIX <= 3.4
    {"proxy_mode": "http", "stream_proxy": {"tcp": [free_port()]}},  # 3.5+
], ids=["no-stream_proxy", "proxy_mode-http"])
def test_stream_mode_off_binds_no_stream_listener(start, apisix_section):
    proc, admin_port, log = start(apisix_section)
    assert listening_ports(proc.pid) == {admin_port}
    text = log.read_text()
    assert "stream mode is disabled" in text and "stream proxy listening" not in text
    for method, path, body in (("PUT", "/apisix/admin/stream_routes/1",
                                mqtt_route([node(1883)])),
                               ("GET", "/apisix/admin/stream_routes", None),
                               ("DELETE", "/apisix/admin/stream_routes/1", None)):
        assert admin(admin_port, method, path, body) == (400, STREAM_OFF)
    status, _ = admin(admin_port, "PUT", "/apisix/admin/upstreams/1",
                      {"type": "roundrobin", "nodes": {"127.0.0.1:1883": 1}})
    assert status == 201


def test_positive_control_a_stream_listener_is_seen(start):
    stream_port = free_port()
    proc, admin_port, _ = start({"stream_proxy": {"tcp": ["%s:%d" % (HOST, stream_port)]}})
    wait_listening(stream_port, proc, timeout=15, what="gproxy stream listener")
    assert listening_ports(proc.pid) == {admin_port, stream_port}
    status, body = admin(admin_port, "GET", "/apisix/admin/stream_routes")
    assert (status, body["total"]) == (200, 0)
