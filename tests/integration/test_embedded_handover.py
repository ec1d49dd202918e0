"""An embedded gproxy moves without disconnecting anyone, in both modes.

* The host program's own restart: ``hand_over(path)`` in the old proxy,
  ``gproxy.start(config, take_over=path)`` in the new one.  Both proxies run
  in this (unpatched) test process, as the two processes of a host's restart
  would (in thread mode each on its own hub thread, in process mode each
  with its own child).
* The process mode's ``proxy.upgrade()``: a new child takes every listener
  and session from the old one while the host goes on.

Paho clients with Wills (MQTT 3.1.1 and 5.0) publish QoS 1 through the proxy
across the move and must notice nothing: no disconnect, no Will, every
message once and in order both ways; the listener takes newcomers after.
"""

import os
import threading
import time

import pytest

import gproxy
from tests import needs
from tests.integration.conftest import HOST, free_port, mqtt_route, node, wait_until
from tests.integration.embedding import embedded_below, gone, write_conf
from tests.integration.helpers import Paho
from tests.integration.test_lifecycle import assert_no_will, will_watcher, with_will
from tests.integration.test_upgrade import Stream, Traffic

mqtt = needs.module("paho.mqtt.client", "bash scripts/venv.sh test")

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def conf_for(tmp_path, port):
    return {"apisix": {"stream_proxy": {"tcp": ["%s:%d" % (HOST, port)]}},
            "deployment": {"admin": False},
            "gproxy": {"store": {"path": str(tmp_path / "apisix.yaml")}}}


@pytest.mark.parametrize("mode", ["process", "thread"])
def test_a_host_restart_hands_the_embedded_proxy_over(mosquitto, tmp_path, mode):
    broker = mosquitto()
    conf = conf_for(tmp_path, free_port())
    old = gproxy.start(conf, mode=mode)
    old.routes.put(1, mqtt_route([node(broker)], level=4))
    port = old.port
    watcher = will_watcher(broker)
    client = with_will("embedded-dev", port, mqtt.MQTTv311)
    client.subscribe("gp/embedded", 1)
    before = {s["client_id"]: s["id"] for s in old.sessions()["list"]}
    path = str(tmp_path / "handover.sock")
    started = {}
    thread = threading.Thread(target=lambda: started.update(new=gproxy.start(
        conf, mode=mode, take_over=path, timeout=30)))
    thread.start()
    assert wait_until(lambda: os.path.exists(path), 30)
    old_pid = old.pid if mode == "process" else None
    assert old.hand_over(path) == 1
    thread.join(30)
    new = started["new"]
    try:
        if mode == "process":
            assert new.pid != old_pid and wait_until(lambda: gone(old_pid), 10)
        assert {s["client_id"]: s["id"] for s in new.sessions()["list"]} == before
        assert new.stats()["sessions_total"] >= 1  # counted by the old proxy, carried
        assert new.routes.get(1)["value"]["id"] == "1"  # the store, written by the new one
        client.publish("gp/embedded", b"after", 1)
        assert client.expect_message().payload == b"after"
        with Paho("embedded-new", port) as newcomer:  # the listener moved too
            newcomer.publish("gp/embedded", b"newcomer", 1)
        assert client.expect_message().payload == b"newcomer"
        time.sleep(0.3)
        assert not client.disconnected.is_set()
        assert_no_will(watcher)
    finally:
        client.close()
        watcher.close()
        new.stop()


@pytest.mark.parametrize("workers", [1, 2])
def test_upgrade_replaces_the_child_and_nobody_notices(mosquitto, tmp_path, workers):
    """``proxy.upgrade()`` under traffic: a new child (the gproxy on disk, the config
    file as it is now) takes every listener and session (with workers=2, old worker i
    gives to new worker i); the host's handle now talks to it, the old child is gone,
    and the Admin API (HTTP and the handle) answers."""
    broker = mosquitto()
    path, port, admin_port = write_conf(tmp_path, broker.port)
    proxy = gproxy.start(path, workers=workers)
    watcher = will_watcher(broker)
    streams = [Stream("emb-raw", port, mqtt.MQTTv311),  # the route is MQTT 3.1.1
               Stream("emb-ws", port, mqtt.MQTTv311, "websockets")]
    traffic = None
    try:
        for s in streams:  # each with a Will
            s.start()
        ids = {s["client_id"]: s["id"] for s in proxy.sessions()["list"]}
        traffic = Traffic(broker, streams)
        traffic.thread.start()
        time.sleep(0.5)
        old_pid = proxy.pid
        assert proxy.upgrade() == 2
        assert proxy.pid != old_pid and wait_until(lambda: gone(old_pid), 10)
        assert embedded_below(os.getpid()) == [proxy.pid]
        time.sleep(0.5)  # traffic through the new child only
        traffic.finish()
        for s in streams:
            assert not s.client.disconnected.is_set(), "%s was disconnected" % s.name
        assert_no_will(watcher)
        listed = {s["client_id"]: s for s in proxy.sessions()["list"]}
        assert {c: s["id"] for c, s in listed.items() if c in ids} == ids
        assert proxy.stats()["sessions_total"] >= 2
        proxy.routes.put(2, mqtt_route([node(broker)], level=5, route_id=2))  # the store
        assert proxy.routes.get(2)["value"]["id"] == "2"
        assert relays(port, "after-upgrade")
    finally:
        if traffic is not None:
            traffic.sink.close()
            traffic.source.close()
        for s in streams:
            s.client.close()
        watcher.close()
        proxy.stop()
    assert wait_until(lambda: embedded_below(os.getpid()) == [], 10)  # no child left


def relays(port, tag):
    with Paho("sub-" + tag, port) as sub, Paho("pub-" + tag, port) as pub:
        sub.subscribe("t/" + tag, qos=1)
        pub.publish("t/" + tag, tag.encode(), qos=1)
        return sub.expect_message().payload == tag.encode()


def broken_config(path, tmp_path):
    with open(path, "a") as fh:
        fh.write("bogus_section: [\n")
    return "is not valid YAML"


def dead_interpreter(path, tmp_path):
    """The new code on disk cannot start (a new child that dies before it is ready)."""
    script = tmp_path / "broken-python"
    script.write_text("#!/bin/sh\necho 'the new gproxy cannot start' >&2\nexit 3\n")
    script.chmod(0o755)
    return str(script)


@pytest.mark.parametrize("breaks", [broken_config, dead_interpreter])
def test_an_upgrade_that_fails_keeps_the_old_child(mosquitto, tmp_path, breaks):
    """The config file on disk is broken now, or the new child dies as it starts: the
    upgrade raises HandoverError, and the old child goes on with every session."""
    broker = mosquitto()
    path, port, _ = write_conf(tmp_path, broker.port)
    proxy = gproxy.start(path)
    watcher = will_watcher(broker)
    client = with_will("survivor", port, mqtt.MQTTv311)
    client.subscribe("gp/echo", 1)
    try:
        old_pid = proxy.pid
        said = breaks(path, tmp_path)
        if said != "is not valid YAML":
            proxy.python, said = said, "exited with status 3"
        with pytest.raises(gproxy.HandoverError, match=said):
            proxy.upgrade(timeout=20)
        assert proxy.pid == old_pid and embedded_below(os.getpid()) == [old_pid]
        client.publish("gp/echo", b"still here", 1)
        assert client.expect_message().payload == b"still here"
        assert not client.disconnected.is_set()
        assert [s["client_id"] for s in proxy.sessions()["list"]] == ["survivor"]
        assert relays(port, "still-accepting")
        assert_no_will(watcher)
    finally:
        client.close()
        watcher.close()
        proxy.stop()


def test_the_thread_mode_upgrades_with_its_host(tmp_path):
    proxy = gproxy.start(conf_for(tmp_path, free_port()), mode="thread")
    try:
        with pytest.raises(NotImplementedError, match="hand_over"):
            proxy.upgrade()
    finally:
        proxy.stop()
