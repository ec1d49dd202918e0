"""gproxy's life cycle with real processes: SIGTERM drains without Wills, a second
signal forces, SIGHUP reloads the config, the idle timeout follows the keep alive.

Every Will test has a subscriber on the Will topic connected *directly* to the
broker, so it sees any Will the broker publishes, and paho clients that set a
Will and never die: a Will published is a false "device offline".
"""

import signal
import subprocess
import time

import pytest

from tests import needs, packets
from tests.integration.conftest import (HOST, accept_queue, free_port, mqtt_route, node,
                                        wait_until)
from tests.integration.helpers import Paho, dial, recv_exact

mqtt = needs.module("paho.mqtt.client", "bash scripts/venv.sh test")

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

GRACE = 4


def with_will(client_id, port, protocol):
    client = Paho(client_id, port, protocol)
    client.client.will_set("gp/will/" + client_id, b"offline", qos=1)
    return client.connect()


def exit_code(gp, timeout):
    try:
        return gp.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError("gproxy did not exit within %.0fs; log:\n%s"
                             % (timeout, gp.log()[-4000:])) from None


def two_level_routes(broker):
    """Route 4 (MQTT 3.1.1) on the first listener, route 5 (MQTT 5) on the second."""
    return lambda ports: [mqtt_route([node(broker)], level=4, route_id=4, server_port=ports[0]),
                          mqtt_route([node(broker)], level=5, route_id=5, server_port=ports[1])]


def will_watcher(broker):
    watcher = Paho("will-watcher", broker.port).connect()
    watcher.subscribe("gp/will/#", 1)
    return watcher


def assert_no_will(watcher):
    try:
        msg = watcher.expect_message(timeout=1.5)
    except AssertionError:
        return
    raise AssertionError("the broker published a Will: %s %r" % (msg.topic, msg.payload))


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_ends_sessions_cleanly_and_publishes_no_will(mosquitto, gproxy, workers):
    broker = mosquitto()
    gp = gproxy(two_level_routes(broker), listeners=2, workers=workers,
                config={"gproxy": {"shutdown": {"grace": GRACE}}})
    watcher = will_watcher(broker)
    v3 = [with_will("dev3-%d" % i, gp.ports[0], mqtt.MQTTv311) for i in range(5)]
    v5 = [with_will("dev5-%d" % i, gp.ports[1], mqtt.MQTTv5) for i in range(5)]
    v5[0].subscribe("gp/load", 1)  # traffic in flight while we stop
    for _ in range(20):
        v3[0].publish("gp/load", b"x" * 100, 1)
    started = time.monotonic()
    gp.proc.send_signal(signal.SIGTERM)
    for client in v3 + v5:
        assert client.disconnected.wait(GRACE + 5), "a client was never disconnected"
    assert exit_code(gp, GRACE + 10) == 0
    assert time.monotonic() - started < GRACE + 4, "the drain overran its grace period"
    for client in v5:
        assert client.disconnect_reason.value == 0x8B, client.disconnect_reason  # shutting down
    for client in v3:  # 3.1.1 has no server DISCONNECT: the client just sees a close
        assert client.disconnect_reason.is_failure
    for client in v3 + v5:
        client.close()
    for cid in ["dev3-%d" % i for i in range(5)] + ["dev5-%d" % i for i in range(5)]:
        broker.log.wait_for("Client %s disconnected." % cid, timeout=5)  # a DISCONNECT, not a drop
    assert_no_will(watcher)
    watcher.close()
    assert "asked 10 sessions to end" in gp.log() or workers > 1


def test_a_configured_peer_gets_mqtt5_clients_use_another_server(mosquitto, gproxy):
    broker = mosquitto()
    gp = gproxy(two_level_routes(broker), listeners=2, config={"gproxy": {"shutdown": {
        "grace": GRACE, "server_reference": "gproxy-b.example:1883"}}})
    watcher = will_watcher(broker)
    client = with_will("dev5-peer", gp.ports[1], mqtt.MQTTv5)
    gp.proc.send_signal(signal.SIGTERM)
    assert client.disconnected.wait(GRACE + 5)
    assert client.disconnect_reason.value == 0x9C, client.disconnect_reason
    assert client.disconnect_properties.ServerReference == "gproxy-b.example:1883"
    assert exit_code(gp, GRACE + 10) == 0
    client.close()
    assert_no_will(watcher)
    watcher.close()


def test_a_second_sigterm_forces(holding_sink, gproxy):
    """A broker stuck mid-packet (and not closing after our DISCONNECT) keeps its
    session from ending cleanly: the first SIGTERM waits (grace 60 s); the
    second closes it at once."""
    sink = holding_sink
    gp = gproxy([mqtt_route([node(sink)], level=4)],
                config={"gproxy": {"shutdown": {"grace": 60}}})
    sock = dial(gp.port)
    sock.sendall(packets.connect_v311("stuck"))
    upstream = sink.wait_for_connection()
    upstream.wait_for_bytes(len(packets.connect_v311("stuck")))
    upstream.send(b"\x30\x20\x00")  # the start of a 34-byte PUBLISH, never finished
    assert recv_exact(sock, 3) == b"\x30\x20\x00"
    mark = gp.mark()
    gp.proc.send_signal(signal.SIGTERM)
    gp.wait_for_log("ending 1 sessions cleanly", since=mark)
    # the broker got its DISCONNECT after the client's last whole packet
    assert upstream.wait_for_bytes(21).endswith(b"\xe0\x00")
    time.sleep(0.5)
    assert gp.proc.poll() is None, "gproxy gave up on the drain without a second signal"
    forced = time.monotonic()
    gp.proc.send_signal(signal.SIGTERM)
    assert exit_code(gp, 10) == 0
    assert time.monotonic() - forced < 5
    sock.settimeout(5)
    assert sock.recv(100) in (b"",)  # closed
    sock.close()


def test_sighup_adds_and_removes_listeners_without_dropping_a_session(mosquitto, gproxy):
    broker = mosquitto()
    gp = gproxy([mqtt_route([node(broker)], level=4)], listeners=2, log_level=None,
                config={"nginx_config": {"error_log_level": "info"}})
    keep, drop = gp.ports
    sub = Paho("reload-sub", drop).connect()  # lives on the listener that goes away
    sub.subscribe("gp/reload", 1)
    new = free_port()
    cfg = gp.cfg
    cfg["apisix"]["stream_proxy"]["tcp"] = ["%s:%d" % (HOST, keep), "%s:%d" % (HOST, new)]
    cfg["nginx_config"] = {"error_log_level": "warn"}
    gp.write_config(cfg)
    mark = gp.mark()
    gp.proc.send_signal(signal.SIGHUP)
    gp.wait_for_log("reload: configuration from", since=mark)
    gp.wait_for_log("stream proxy listening on %s:%d" % (HOST, new), since=mark)
    gp.wait_for_log("no longer listening on %s:%d" % (HOST, drop), since=mark)
    with Paho("reload-pub", new) as pub:  # the new listener serves
        pub.publish("gp/reload", b"after reload", 1)
    msg = sub.expect_message()  # ...and the session on the removed one lives on
    assert msg.payload == b"after reload"
    assert not sub.disconnected.is_set()
    try:
        dial(drop, timeout=1).close()
        raise AssertionError("the removed listener still accepts")
    except ConnectionRefusedError:
        pass
    # the log level went from info to warn: no more per-session info lines
    later = gp.mark()
    with Paho("quiet-client", keep):  # connected: its CONNACK came through gproxy, which
        pass                          # logs "mqtt client id" in preread, before the dial
    assert not gp.find("mqtt client id: quiet-client", since=later)
    sub.close()


def test_sighup_with_a_bad_config_keeps_the_running_one(mosquitto, gproxy):
    broker = mosquitto()
    gp = gproxy([mqtt_route([node(broker)], level=4)])
    with open(gp.config_path, "w") as fh:
        fh.write("gproxy:\n  max_connections: many\n")
    mark = gp.mark()
    gp.proc.send_signal(signal.SIGHUP)
    line = gp.wait_for_log("keeping the running configuration", since=mark)
    assert "gproxy.max_connections" in line
    assert gp.proc.poll() is None
    with Paho("still-serving", gp.port):
        pass


def test_sighup_applies_a_new_max_connections(sink, gproxy):
    gp = gproxy([mqtt_route([node(sink)], level=4)])
    cfg = gp.cfg
    cfg.setdefault("gproxy", {})["max_connections"] = 1
    gp.write_config(cfg)
    mark = gp.mark()
    gp.proc.send_signal(signal.SIGHUP)
    gp.wait_for_log("reload: configuration from", since=mark)
    first = dial(gp.port)
    first.sendall(packets.connect_v311("one"))
    sink.wait_for_connection(0)
    second = dial(gp.port)  # accepted by the kernel, not by gproxy
    second.sendall(packets.connect_v311("two"))
    assert wait_until(lambda: accept_queue(gp.port) == 1, 5), "gproxy accepted the second"
    assert sink.settle() == 1
    first.close()
    sink.wait_for_connection(1)
    second.close()


def test_sighup_names_the_etcd_change_it_cannot_apply_and_applies_the_admin_timeout(gproxy):
    """A changed ``deployment.etcd.host`` / ``config_provider`` needs a new store:
    the reload says so (and keeps the file store); the HTTP listeners' timeout
    is applied to the running listener."""
    gp = gproxy([])
    cfg = gp.cfg
    cfg["deployment"]["etcd"] = {"host": ["http://127.0.0.2:2379"]}
    cfg["deployment"]["role_traditional"] = {"config_provider": "etcd"}
    cfg["gproxy"]["admin"] = {"timeout": 1}
    gp.write_config(cfg)
    mark = gp.mark()
    gp.proc.send_signal(signal.SIGHUP)
    gp.wait_for_log("reload: configuration from", since=mark)
    (line,) = gp.find("takes a restart", since=mark)
    assert "deployment.role_traditional.config_provider, deployment.etcd.host changed" in line
    assert "gproxy.admin" not in line
    idle = dial(gp.admin_port, timeout=5)
    started = time.monotonic()
    assert idle.recv(1) == b"", "the new idle timeout did not apply"
    assert time.monotonic() - started < 4.0
    idle.close()
    assert gp.admin("PUT", "/upstreams/1", {"nodes": {"127.0.0.1:1": 1}})[0] == 201


def test_idle_timeout_follows_the_keep_alive(sink, gproxy):
    """A client that announced keep alive 1 s and went silent is dropped after
    ~1.5 s, not after gproxy.proxy.timeout; keep alive 0 falls back to it."""
    gp = gproxy([mqtt_route([node(sink)], level=4)],
                config={"gproxy": {"proxy": {"timeout": 600}}})
    quiet = dial(gp.port, timeout=10)
    quiet.sendall(packets.connect_v311("ka-1", keepalive=1))
    forever = dial(gp.port, timeout=10)
    forever.sendall(packets.connect_v311("ka-0", keepalive=0))
    sink.wait_for_connection(1)
    started = time.monotonic()
    assert quiet.recv(10) == b""
    took = time.monotonic() - started
    assert 1.2 <= took <= 4.0, took
    line = gp.wait_for_session_line(quiet.getsockname()[1], "session closed")
    assert "reason=idle" in line
    # the other one is still relaying, now that the first one's 1.5 s are over
    forever.setblocking(False)
    with pytest.raises(BlockingIOError):  # open: nothing to read, and no EOF
        forever.recv(10)
    code, live = gp.admin("GET", "/gproxy/sessions?client_id=ka-0")
    assert code == 200 and [s["state"] for s in live["list"]] == ["relaying"], live
    quiet.close()
    forever.close()


def test_sighup_reaches_every_worker(mosquitto, gproxy):
    broker = mosquitto()
    gp = gproxy([mqtt_route([node(broker)], level=4)], workers=2)
    new = free_port()
    cfg = gp.cfg
    cfg["apisix"]["stream_proxy"]["tcp"].append("%s:%d" % (HOST, new))
    gp.write_config(cfg)
    mark = gp.mark()
    gp.proc.send_signal(signal.SIGHUP)
    ok = wait_until(lambda: len(gp.find("stream proxy listening on %s:%d" % (HOST, new),
                                        since=mark)) == 2, 10)
    assert ok, gp.log(mark)
    for i in range(6):  # the kernel spreads these over both workers' sockets
        with Paho("hup-%d" % i, new):
            pass
    assert gp.proc.poll() is None
