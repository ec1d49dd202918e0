"""gproxy embedded in a synchronous program: ``gproxy.start(config)``.

The main test runs ``embedded_program.py`` as a child: a plain threaded program
whose own threads keep doing blocking I/O while paho clients relay through the
embedded proxy to mosquitto; its JSON report is checked here.  The others run
``gproxy.start`` in this (unpatched) test process for the refusals.
"""

import errno
import json
import os
import socket
import subprocess
import sys
import threading

import pytest

import gproxy
from gproxy.errors import SchemaError
from tests.integration.conftest import HOST, free_port

pytestmark = pytest.mark.integration
PROGRAM = os.path.join(os.path.dirname(__file__), "embedded_program.py")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_program(broker, tmp_path, mode, embed_mode):
    out = subprocess.run([sys.executable, PROGRAM, str(broker.port), str(tmp_path), mode,
                          embed_mode],
                         cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "Traceback" not in out.stderr, out.stderr[-4000:]
    return json.loads(out.stdout)


@pytest.mark.parametrize("embed_mode", ["process", "thread"])
@pytest.mark.parametrize("mode", ["admin", "no-admin"])
def test_a_threaded_program_embeds_gproxy(mosquitto, tmp_path, mode, embed_mode):
    broker = mosquitto()
    report = run_program(broker, tmp_path, mode, embed_mode)
    assert report["mode"] == embed_mode
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
    # the proxy ran where the mode says: a hub thread here, or a child process that
    # got none of the host's sockets
    if embed_mode == "thread":
        assert "gproxy-hub" in report["threads_running"]
        assert report["child_pid"] is None
    else:
        assert "gproxy-channel" in report["threads_running"]
        assert "gproxy-hub" not in report["threads_running"]
        assert report["child_pid"] and report["shared_sockets"] == []
    # after stop: listeners closed, no thread, process or descriptor left, handle refuses
    assert report["stream_closed"]
    assert report["threads_after"] == report["threads_before"]
    assert report["fds_after"] == report["fds_before"]
    assert report["child_gone"]
    assert report["after_stop_call"][0] == ("HubStopped" if embed_mode == "thread"
                                            else "ProxyStopped")


def _conf(tmp_path, port, **extra):
    conf = {"apisix": {"stream_proxy": {"tcp": ["%s:%d" % (HOST, port)]},
                       "enable_control": False},  # no fixed port: tests run side by side
            "plugin_attr": {"prometheus": {"enable_export_server": False}},
            "deployment": {"admin": False},
            "gproxy": {"store": {"path": str(tmp_path / "apisix.yaml")}}}
    conf.update(extra)
    return conf


def _gproxy_threads():
    return [t for t in threading.enumerate() if t.name in ("gproxy-hub", "gproxy-channel")]


def _gproxy_children(parent=None):
    """The embedded gproxy processes whose parent is ``parent`` (default: this one)."""
    parent = str(parent or os.getpid())
    found = []
    for name in os.listdir("/proc"):
        try:
            with open("/proc/%s/stat" % name) as fh:
                ppid = fh.read().rsplit(")", 1)[1].split()[1]
            with open("/proc/%s/cmdline" % name, "rb") as fh:
                embedded = b"--embedded-by" in fh.read()
        except (OSError, IndexError):
            continue
        if ppid == parent and embedded:
            found.append(int(name))
    return found


@pytest.fixture
def nothing_left():
    """After the test: no gproxy thread and no embedded gproxy process of this one."""
    yield
    assert not _gproxy_threads()
    assert not _gproxy_children()


MODES = pytest.mark.parametrize("embed_mode", ["process", "thread"])


def test_thread_mode_refuses_workers(tmp_path, nothing_left):
    with pytest.raises(ValueError, match="mode='thread' embedded gproxy runs in this process"):
        gproxy.start(_conf(tmp_path, free_port()), mode="thread", workers=2)


def test_an_unknown_mode_is_refused(tmp_path, nothing_left):
    with pytest.raises(ValueError, match="mode 'process' or 'thread'"):
        gproxy.start(_conf(tmp_path, free_port()), mode="fork")


@MODES
def test_a_port_in_use_raises_the_reason_and_leaves_nothing(tmp_path, embed_mode,
                                                            nothing_left):
    taken = socket.socket()
    taken.bind((HOST, 0))
    taken.listen()
    try:
        with pytest.raises(OSError, match="cannot listen on 127.0.0.1:%d"
                           % taken.getsockname()[1]) as info:
            gproxy.start(_conf(tmp_path, taken.getsockname()[1]), mode=embed_mode)
    finally:
        taken.close()
    assert info.value.errno == errno.EADDRINUSE


@MODES
def test_a_bad_config_raises_config_error(tmp_path, embed_mode, nothing_left):
    from gproxy.errors import ConfigError
    with pytest.raises(ConfigError, match="gproxy.max_connections"):
        gproxy.start(_conf(tmp_path, free_port(), gproxy={"max_connections": -1}),
                     mode=embed_mode)


@pytest.mark.parametrize("store", ["not yaml", "a directory"])
def test_a_bad_store_raises_the_same_exception_in_both_modes(tmp_path, store, nothing_left):
    """The store is read where the proxy runs (the child, in process mode): its error
    still reaches the caller, as the exception the thread mode raises."""
    path = tmp_path / "apisix.yaml"
    if store == "a directory":
        path.mkdir()
    else:
        path.write_text("stream_routes: [\n")
    raised = []
    for mode in ("thread", "process"):
        with pytest.raises(Exception) as info:
            gproxy.start(_conf(tmp_path, free_port()), mode=mode)
        raised.append((type(info.value), str(info.value)))
    assert raised[0] == raised[1]
    assert raised[0][0] is (SchemaError if store == "not yaml" else IsADirectoryError)
    assert str(path) in raised[0][1]


@MODES
def test_a_config_file_path_works_and_stop_is_idempotent(tmp_path, embed_mode, nothing_left):
    path = tmp_path / "config.yaml"
    port = free_port()
    path.write_text("apisix:\n  stream_proxy:\n    tcp: ['%s:%d']\n"
                    "deployment:\n  admin: false\n" % (HOST, port))
    with gproxy.start(str(path), mode=embed_mode) as proxy:
        assert proxy.addresses == [(HOST, port)]
        assert proxy.admin_address is None
        assert proxy.upstreams.put("u1", {"nodes": {"127.0.0.1:1": 1}})["value"]["id"] == "u1"
    # the store file sits next to the config file, as for the gproxy command (the
    # write went to its journal; stopping folded it into the file)
    assert "u1" in (tmp_path / "apisix.yaml").read_text()
    proxy.stop()  # a second stop is a no-op


@pytest.mark.parametrize("python", ["/nonexistent/python", "/bin/false"])
def test_process_mode_without_an_interpreter_says_so(tmp_path, python, nothing_left):
    """``python=`` (for hosts whose sys.executable is not Python) that is wrong: the
    reason, in the caller's thread, and nothing left behind."""
    with pytest.raises((OSError, gproxy.ProxyStopped)) as info:
        gproxy.start(_conf(tmp_path, free_port()), python=python)
    if python == "/bin/false":
        assert "exited with status 1 before it was ready" in str(info.value)
    else:
        assert isinstance(info.value, FileNotFoundError)


def test_process_mode_runs_workers_in_the_child(mosquitto, tmp_path, nothing_left):
    """workers=N forks the proxy processes from the child, never from the host."""
    from tests.integration.helpers import Paho
    broker = mosquitto()
    with gproxy.start(_conf(tmp_path, free_port()), workers=2) as proxy:
        proxy.routes.put("1", {"plugins": {"mqtt-proxy": {"protocol_name": "MQTT",
                                                          "protocol_level": 4}},
                               "upstream": {"type": "roundrobin", "nodes": {broker.addr: 1}}})
        child, = _gproxy_children()  # one child: the workers are its own children
        assert child == proxy.pid and len(_gproxy_children(child)) == 2
        with Paho("w-1", proxy.port), Paho("w-2", proxy.port), Paho("w-3", proxy.port):
            assert proxy.stats()["live_sessions"] == 3
            assert sorted(s["client_id"] for s in proxy.sessions()["list"]) == \
                ["w-1", "w-2", "w-3"]


def test_a_monkey_patched_program_is_told_to_use_process_mode(tmp_path):
    """A gevent program has a hub of its own: the thread mode refuses, the process
    mode works (its handle's waits are cooperative there)."""
    conf = _conf(tmp_path, free_port())
    code = ("from gevent import monkey; monkey.patch_all()\n"
            "import gevent, gproxy\n"
            "try:\n    gproxy.start(%r, mode='thread')\n"
            "except RuntimeError as exc:\n    print(exc)\n"
            "with gproxy.start(%r) as proxy:\n"
            "    calls = [gevent.spawn(proxy.stats) for _ in range(3)]\n"
            "    gevent.joinall(calls, timeout=30)\n"
            "    print('process mode:', [c.value['live_sessions'] for c in calls])\n"
            % (conf, conf))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert "not monkey-patched" in out.stdout and "mode='process'" in out.stdout, out.stderr
    assert "process mode: [0, 0, 0]" in out.stdout, out.stderr


@MODES
def test_an_embedded_proxy_writes_the_access_log_and_reopens_it(mosquitto, tmp_path, embed_mode,
                                                                nothing_left):
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
    with gproxy.start(conf, mode=embed_mode) as proxy:
        proxy.routes.put("1", {"plugins": {"mqtt-proxy": {"protocol_level": 4}},
                               "upstream": {"nodes": {broker.addr: 1}}})
        session("emb-1")
        assert wait_until(lambda: lines(path), 5) == ["emb-1 200 %s" % broker.addr]
        path.rename(tmp_path / "access.log.1")
        proxy.reopen_logs()
        assert wait_until(path.exists, 5)
        session("emb-2")
        assert wait_until(lambda: lines(path), 5) == ["emb-2 200 %s" % broker.addr]
