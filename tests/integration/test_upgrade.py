"""Live upgrade (SIGUSR2) with real processes: paho clients with Wills publish QoS 1
through gproxy, raw and over WebSocket, MQTT 3.1.1 and 5.0, while gproxy is
replaced by a new process; nobody may notice.

Each proxied client publishes a numbered stream up (checked by a subscriber on
the broker itself) and receives a numbered stream down (published on the broker
itself): every number must arrive exactly once and in order.  A Will watcher on
the broker sees any Will; the broker's log shows any disconnection; a poller
checks the Admin API and the dashboard answer all along.  A TLS-terminated
session cannot move: it must end cleanly (MQTT 5 DISCONNECT 0x8B, no Will).
Smaller tests: systemd's notify protocol across an upgrade, and PROXY protocol
and non-MQTT sessions moving with their record and bytes.
"""

import os
import signal
import threading
import time

import pytest

from bench.procstat import gone
from tests import needs, packets, wire
from tests.integration.conftest import HOST, mqtt_route, node, wait_until
from tests.integration.helpers import Paho, dial, http_call, recv_exact
from tests.integration.test_lifecycle import assert_no_will, will_watcher
from tests.integration.test_tls import Pki  # the TLS tests' certificates

mqtt = needs.module("paho.mqtt.client", "bash scripts/venv.sh test")

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

KEY = {"X-API-KEY": "edd1c9f034335f136f87ad84b625c8f1"}
RATE = 0.02  # seconds between two messages of one stream


def routes(broker):
    return lambda ports: [
        mqtt_route([node(broker)], level=4, route_id=4, server_port=ports[0]),
        mqtt_route([node(broker)], level=5, route_id=5, server_port=ports[1]),
        mqtt_route([node(broker)], level=5, route_id="tls", server_port=ports[2]),
    ]


def listeners(ports):
    return {"apisix": {"stream_proxy": {"tcp": [
        "%s:%d" % (HOST, ports[0]), "%s:%d" % (HOST, ports[1]),
        {"addr": "%s:%d" % (HOST, ports[2]), "tls": True}]}},
        "gproxy": {"shutdown": {"grace": 4}}}


class Stream:
    """One proxied client: a numbered stream up and one down, with a Will."""

    def __init__(self, name, port, protocol, transport="tcp"):
        self.name = name
        self.client = Paho(name, port, protocol, transport=transport)
        self.client.client.will_set("gp/will/" + name, b"offline", qos=1)
        self.sent_up = 0
        self.got_down = []

    def start(self):
        self.client.connect()
        self.client.subscribe("gp/down/" + self.name, 1)
        return self

    def publish(self, n):
        self.client.client.publish("gp/up/" + self.name, str(n).encode(), 1)
        self.sent_up = n + 1

    def drain_down(self):
        while not self.client.messages.empty():
            self.got_down.append(int(self.client.messages.get().payload))


class Traffic:
    """Streams up from every client and down to every one, until stopped."""

    def __init__(self, broker, streams):
        self.streams = streams
        self.up = {s.name: [] for s in streams}
        self.sink = Paho("upgrade-sink", broker.port).connect()
        self.sink.client.on_message = self._up
        self.sink.subscribe("gp/up/#", 1)
        self.source = Paho("upgrade-source", broker.port).connect()
        self.sent_down = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _up(self, client, userdata, message):
        self.up[message.topic.rpartition("/")[2]].append(int(message.payload))

    def _run(self):
        n = 0
        while not self.stop.is_set() and n < 5000:
            for s in self.streams:
                s.publish(n)
                self.source.client.publish("gp/down/" + s.name, str(n).encode(), 1)
            self.sent_down = n + 1
            n += 1
            time.sleep(RATE)

    def finish(self):
        self.stop.set()
        self.thread.join(10)

        def complete():
            for s in self.streams:
                s.drain_down()
            return all(len(self.up[s.name]) >= s.sent_up and len(s.got_down) >= self.sent_down
                       for s in self.streams)
        wait_until(complete, 20)
        for s in self.streams:
            assert self.up[s.name] == list(range(s.sent_up)), "%s: up stream %s..." % (
                s.name, _gaps(self.up[s.name], s.sent_up))
            assert s.got_down == list(range(self.sent_down)), "%s: down stream %s..." % (
                s.name, _gaps(s.got_down, self.sent_down))


def _gaps(got, want):
    return "got %d of %d, first wrong at %s" % (
        len(got), want, next((i for i, v in enumerate(got) if v != i), None))


class Poller:
    """The Admin API and the dashboard, asked every 50 ms; every failure is kept."""

    def __init__(self, gp):
        self.gp = gp
        self.failures = []
        self.answers = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.is_set():
            for path, headers in (("/apisix/admin/gproxy/sessions", KEY), ("/ui/", {})):
                try:
                    status, _ = http_call(self.gp.admin_port, "GET", path, headers=headers,
                                          timeout=5)
                except OSError as exc:
                    self.failures.append("%s: %s" % (path, exc))
                    continue
                if status != 200:
                    self.failures.append("%s: %d" % (path, status))
                self.answers += 1
            time.sleep(0.05)

    def finish(self):
        self.stop.set()
        self.thread.join(10)
        assert not self.failures, self.failures[:5]
        assert self.answers > 20


def new_pid(gp, mark, timeout=60):
    line = gp.wait_for_log("upgrade: handed", timeout=timeout, since=mark)
    return int(line.split("to pid ")[1].split()[0])


def stop_pid(pid, timeout=15):
    """Stop the process that took over (not our child: it was the old gproxy's)."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    assert wait_until(lambda: gone(pid), timeout), "pid %d did not stop" % pid


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return Pki(str(tmp_path_factory.mktemp("pki")))


@pytest.mark.parametrize("workers", [1, 2])
def test_an_upgrade_under_load_disconnects_nobody(mosquitto, gproxy, pki, workers):
    broker = mosquitto()
    gp = gproxy(routes(broker), listeners=3, workers=workers, config=listeners)
    status, _ = gp.admin("PUT", "/ssls/1", pki.ssl_object(1, ["tenant-a.example"]))
    assert status in (200, 201)
    watcher = will_watcher(broker)
    streams = [Stream("v3-raw", gp.ports[0], mqtt.MQTTv311),
               Stream("v5-raw", gp.ports[1], mqtt.MQTTv5),
               Stream("v3-ws", gp.ports[0], mqtt.MQTTv311, "websockets"),
               Stream("v5-ws", gp.ports[1], mqtt.MQTTv5, "websockets")]
    for s in streams:
        s.start()
    tls = Paho("v5-tls", gp.ports[2], mqtt.MQTTv5, tls_context=pki.client_context(
        "tenant-a.example"))
    tls.client.will_set("gp/will/v5-tls", b"offline", qos=1)
    wait_until(lambda: _try_connect(tls), 10)
    ids_before = {s["client_id"]: s["id"] for s in gp.admin("GET", "/gproxy/sessions")[1]["list"]}
    traffic = Traffic(broker, streams)
    poller = Poller(gp)
    traffic.thread.start()
    time.sleep(1.0)
    mark, broker_mark = gp.mark(), broker.log.mark()
    old = gp.proc.pid
    gp.proc.send_signal(signal.SIGUSR2)
    pid = new_pid(gp, mark)
    try:
        assert gp.proc.wait(timeout=20) == 0, "the old process did not exit cleanly"
        time.sleep(1.0)  # traffic through the new process only
        traffic.finish()
        poller.finish()
        for s in streams:
            assert not s.client.disconnected.is_set(), "%s was disconnected" % s.name
        # the TLS session could not move: it ended as at SIGTERM
        assert tls.disconnected.wait(10)
        assert tls.disconnect_reason.value == 0x8B, tls.disconnect_reason
        broker.log.wait_for("Client v5-tls disconnected.", timeout=5, since=broker_mark)
        dropped = [ln for ln in broker.log.lines(broker_mark) if "disconnected" in ln
                   or "closed its connection" in ln or "exceeded timeout" in ln]
        assert all("v5-tls" in ln for ln in dropped), dropped
        assert_no_will(watcher)
        listed = {s["client_id"]: s for s in gp.admin("GET", "/gproxy/sessions")[1]["list"]}
        for s in streams:  # the same session (id, counters) in the sessions view
            assert listed[s.name]["id"] == ids_before[s.name]
            assert listed[s.name]["bytes_in"] > 0 and listed[s.name]["state"] == "relaying"
        assert "v5-tls" not in listed
        assert old != pid
    finally:
        for s in streams:
            s.client.close()
        tls.close()
        watcher.close()
        traffic.sink.close()
        traffic.source.close()
        stop_pid(pid)


def _try_connect(client):
    try:
        client.connect()
        return True
    except (AssertionError, OSError):
        return False


def test_systemd_follows_the_new_main_process(mosquitto, gproxy, tmp_path, monkeypatch):
    """The notify socket protocol as a Type=notify, NotifyAccess=all unit sees it
    (no systemd runs as PID 1 here): READY=1 at start; at USR2 RELOADING=1 from the
    old process, then MAINPID=<new> and READY=1 from the new one before the old exits."""
    import socket
    path = str(tmp_path / "notify")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(path)
    notify.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    notify.settimeout(30)
    broker = mosquitto()  # (before NOTIFY_SOCKET: Debian's mosquitto speaks it too)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    gp = gproxy([mqtt_route([node(broker)], level=4)])

    def message():
        data, anc, _, _ = notify.recvmsg(4096, socket.CMSG_SPACE(12))
        pid = next(int.from_bytes(d[:4], "little") for level, kind, d in anc
                   if kind == socket.SCM_CREDENTIALS)
        return pid, dict(line.split("=", 1) for line in data.decode().splitlines())

    assert message() == (gp.proc.pid, {"READY": "1"})
    with Paho("notified", gp.port) as client:
        gp.proc.send_signal(signal.SIGUSR2)
        pid, fields = message()
        assert pid == gp.proc.pid and fields["RELOADING"] == "1"
        assert int(fields["MONOTONIC_USEC"]) <= time.monotonic() * 1e6
        pid, fields = message()
        try:
            assert pid != gp.proc.pid and fields["MAINPID"] == str(pid)
            assert fields["READY"] == "1"
            assert gp.proc.wait(timeout=20) == 0  # the old one exits after it
            client.publish("gp/x", b"still connected", 1)
            assert not client.disconnected.is_set()
        finally:
            stop_pid(pid)
    notify.close()


def test_proxy_protocol_sessions_and_plain_tcp_routes_move_as_they_are(gproxy, sink):
    """PROXY protocol both ways on an MQTT route, and a non-MQTT TCP route: after the
    upgrade the record keeps the address from the header, the node got its header once
    (before the CONNECT, never again), and bytes go on both ways from where they were."""
    def config(ports):
        return {"apisix": {"stream_proxy": {"tcp": [
            {"addr": "%s:%d" % (HOST, ports[0]), "proxy_protocol": True,
             "proxy_protocol_to_upstream": True}, "%s:%d" % (HOST, ports[1])]}},
            "nginx_config": {"stream": {
                "enable_access_log": True, "access_log": "logs/stream.log",
                "access_log_format": "$pid $session_id $upstream_addr $bytes_received"}}}
    gp = gproxy(lambda ports: [
        mqtt_route([node(sink)], type_="roundrobin", route_id=1, server_port=ports[0]),
        {"id": 2, "server_port": ports[1],
         "upstream": {"type": "roundrobin", "nodes": [node(sink)]}}],
        listeners=2, config=config)
    mqtt_client = dial(gp.ports[0])
    header = wire.proxy_v1("192.0.2.50", "10.0.0.1", 6000, 8883)
    connect = packets.connect_v311(b"pp-moved")
    mqtt_client.sendall(header + connect + packets.publish("a", b"x" * 100)[:40])  # mid-packet
    mqtt_conn = sink.wait_for_connection(0)
    want = wire.proxy_v1("192.0.2.50", HOST, 6000, gp.ports[0])
    mqtt_conn.wait_for_bytes(len(want) + len(connect) + 40)
    tcp_client = dial(gp.ports[1])
    tcp_client.sendall(b"before")
    tcp_conn = sink.wait_for_connection(1)
    tcp_conn.wait_for_bytes(6)
    mark = gp.mark()
    gp.proc.send_signal(signal.SIGUSR2)
    pid = new_pid(gp, mark)
    try:
        assert gp.proc.wait(timeout=20) == 0
        mqtt_client.sendall(packets.publish("a", b"x" * 100)[40:] + packets.pingreq())
        mqtt_conn.send(b"\xd0\x00")
        assert recv_exact(mqtt_client, 2) == b"\xd0\x00"
        sent = want + connect + packets.publish("a", b"x" * 100) + packets.pingreq()
        packets.assert_packet(mqtt_conn.wait_for_bytes(len(sent)), sent, "one header, no gap")
        tcp_client.sendall(b" after")
        assert tcp_conn.wait_for_bytes(12) == b"before after"
        tcp_conn.send(b"back")
        assert recv_exact(tcp_client, 4) == b"back"
        listed = {s["route_id"]: s for s in gp.admin("GET", "/gproxy/sessions")[1]["list"]}
        assert listed["1"]["client_addr"] == "192.0.2.50" and listed["1"]["client_port"] == 6000
        assert listed["2"]["bytes_in"] == 12 and listed["2"]["bytes_out"] == 4
        tcp_client.close()  # one access log line, from the process it ended in, whole
        path = os.path.join(gp.dir, "logs", "stream.log")
        assert wait_until(lambda: os.path.exists(path) and open(path).read(), 10)
        assert open(path).read().split() == [str(pid), listed["2"]["id"], sink.addr, "12"]
    finally:
        mqtt_client.close()
        tcp_client.close()
        stop_pid(pid)
