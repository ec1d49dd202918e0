"""gproxy embedded in a synchronous program: ``gproxy.start(config)``.

The main test runs ``embedded_program.py`` as a child: a plain threaded program
whose own threads keep doing blocking I/O while paho clients relay through the
embedded proxy to mosquitto; its JSON report is checked here.  The others run
``gproxy.start`` in this (unpatched) test process for the refusals.
"""

import json
import os
import socket
import subprocess
import sys
import threading

import pytest

import gproxy
from tests.integration.conftest import HOST, free_port

pytestmark = pytest.mark.integration
PROGRAM = os.path.join(os.path.dirname(__file__), "embedded_program.py")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_program(broker, tmp_path, mode):
    out = subprocess.run([sys.executable, PROGRAM, str(broker.port), str(tmp_path), mode],
                         cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "Traceback" not in out.stderr, out.stderr[-4000:]
    return json.loads(out.stdout)


@pytest.mark.parametrize("mode", ["admin", "no-admin"])
def test_a_threaded_program_embeds_gproxy(mosquitto, tmp_path, mode):
    broker = mosquitto()
    report = run_program(broker, tmp_path, mode)
    # nothing patched: after import, after start, after stop
    assert report["before_import"] == report["after_import"] == report["after_start"] \
        == report["after_stop"]
    # the Admin API's body, checks and errors
    assert report["put"]["key"] == "/apisix/stream_routes/1"
    assert report["put"]["value"]["id"] == "1"
    assert report["refused"] == [400, "invalid configuration: additional properties "
                                 "forbidden, found bogus"]
    assert report["get_missing"][:2] == ["AdminError", 404]
    assert report["list"]["total"] == 1
    # paho clients relayed through the proxy, from two host threads at once
    assert report["messages"] == {"a": "hello a", "b": "hello b"}
    broker.wait_for_client("sub-a")
    live = report["sessions"]["list"]
    assert [s["client_id"] for s in live] == ["live-1"]
    assert live[0]["node"] == broker.addr
    assert report["stats"]["live_sessions"] == 1
    assert report["stats"]["sessions_total"] >= 5
    # the host's own blocking I/O kept going while gproxy ran, and never failed
    assert report["host_errors"] == []
    assert all(n > 0 for n in report["host_counts_during"].values()), report
    # the Admin API listener is there or not, as configured
    assert report["admin_listening"] is (mode == "admin")
    assert (report["admin_address"] is not None) is (mode == "admin")
    # after stop: listeners closed, no thread and no descriptor left, handle refuses
    assert "gproxy-hub" in report["threads_running"]
    assert report["stream_closed"]
    assert report["threads_after"] == report["threads_before"]
    assert report["fds_after"] == report["fds_before"]
    assert report["after_stop_call"][0] == "HubStopped"


def _conf(tmp_path, port, **extra):
    conf = {"apisix": {"stream_proxy": {"tcp": ["%s:%d" % (HOST, port)]}},
            "deployment": {"admin": False},
            "gproxy": {"store": {"path": str(tmp_path / "apisix.yaml")}}}
    conf.update(extra)
    return conf


def _gproxy_threads():
    return [t for t in threading.enumerate() if t.name == "gproxy-hub"]


def test_workers_are_refused(tmp_path):
    with pytest.raises(ValueError, match="embedded gproxy runs in one process"):
        gproxy.start(_conf(tmp_path, free_port()), workers=2)
    assert not _gproxy_threads()


def test_a_port_in_use_raises_the_reason_and_leaves_nothing(tmp_path):
    taken = socket.socket()
    taken.bind((HOST, 0))
    taken.listen()
    try:
        with pytest.raises(OSError, match="cannot listen on 127.0.0.1:%d"
                           % taken.getsockname()[1]):
            gproxy.start(_conf(tmp_path, taken.getsockname()[1]))
    finally:
        taken.close()
    assert not _gproxy_threads()


def test_a_bad_config_raises_config_error(tmp_path):
    from gproxy.errors import ConfigError
    with pytest.raises(ConfigError, match="gproxy.max_connections"):
        gproxy.start(_conf(tmp_path, free_port(), gproxy={"max_connections": -1}))
    assert not _gproxy_threads()


def test_a_config_file_path_works_and_stop_is_idempotent(tmp_path):
    path = tmp_path / "config.yaml"
    port = free_port()
    path.write_text("apisix:\n  stream_proxy:\n    tcp: ['%s:%d']\n"
                    "deployment:\n  admin: false\n" % (HOST, port))
    with gproxy.start(str(path)) as proxy:
        assert proxy.addresses == [(HOST, port)]
        assert proxy.admin_address is None
        assert proxy.upstreams.put("u1", {"nodes": {"127.0.0.1:1": 1}})["value"]["id"] == "u1"
    # the store file sits next to the config file, as for the gproxy command (the
    # write went to its journal; stopping folded it into the file)
    assert "u1" in (tmp_path / "apisix.yaml").read_text()
    proxy.stop()  # a second stop is a no-op
    assert not _gproxy_threads()


def test_a_monkey_patched_program_is_told_to_use_its_own_hub():
    code = ("from gevent import monkey; monkey.patch_all()\n"
            "import gproxy\n"
            "try:\n    gproxy.start({})\n"
            "except RuntimeError as exc:\n    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert "not monkey-patched" in out.stdout, out.stderr


def test_an_embedded_proxy_writes_the_access_log_and_reopens_it(mosquitto, tmp_path):
    from tests import packets
    from tests.integration.conftest import wait_until
    from tests.integration.helpers import CONNACK_OK, recv_exact
    broker = mosquitto()
    port = free_port()
    path = tmp_path / "access.log"
    conf = _conf(tmp_path, port, nginx_config={"stream": {
        "enable_access_log": True, "access_log": str(path),
        "access_log_format": "$mqtt_client_id $status $upstream_addr"}})

    def session(client_id):
        with socket.create_connection((HOST, port), timeout=5) as sock:
            sock.sendall(packets.connect_v311(client_id))
            assert recv_exact(sock, 4) == CONNACK_OK
            sock.sendall(packets.disconnect())
            assert sock.recv(1) == b""

    def lines(at):
        return at.exists() and at.read_text().splitlines()
    with gproxy.start(conf) as proxy:
        proxy.routes.put("1", {"plugins": {"mqtt-proxy": {"protocol_level": 4}},
                               "upstream": {"nodes": {broker.addr: 1}}})
        session("emb-1")
        assert wait_until(lambda: lines(path), 5) == ["emb-1 200 %s" % broker.addr]
        path.rename(tmp_path / "access.log.1")
        proxy.reopen_logs()
        assert wait_until(path.exists, 5)
        session("emb-2")
        assert wait_until(lambda: lines(path), 5) == ["emb-2 200 %s" % broker.addr]
    assert not _gproxy_threads()
