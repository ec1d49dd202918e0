"""An embedded gproxy moves with its host program: ``hand_over(path)`` in the old
proxy, ``gproxy.start(config, take_over=path)`` in the new one.

Both proxies run in this (unpatched) test process, each on its own hub thread,
as the two processes of a host's restart would: a paho client with a Will keeps
publishing through the listener across the handover and must notice nothing.
"""

import os
import threading
import time

import pytest

import gproxy
from tests.integration.conftest import HOST, free_port, mqtt_route, node, wait_until
from tests.integration.helpers import Paho
from tests.integration.test_lifecycle import assert_no_will, will_watcher, with_will

mqtt = pytest.importorskip("paho.mqtt.client")

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def test_a_host_restart_hands_the_embedded_proxy_over(mosquitto, tmp_path):
    broker = mosquitto()
    port = free_port()
    conf = {"apisix": {"stream_proxy": {"tcp": ["%s:%d" % (HOST, port)]}},
            "deployment": {"admin": False},
            "gproxy": {"store": {"path": str(tmp_path / "apisix.yaml")}}}
    old = gproxy.start(conf, mode="thread")
    old.routes.put(1, mqtt_route([node(broker)], level=4))
    watcher = will_watcher(broker)
    client = with_will("embedded-dev", port, mqtt.MQTTv311)
    client.subscribe("gp/embedded", 1)
    path = str(tmp_path / "handover.sock")
    started = {}
    thread = threading.Thread(target=lambda: started.update(new=gproxy.start(
        conf, mode="thread", take_over=path, timeout=20)))
    thread.start()
    assert wait_until(lambda: os.path.exists(path), 10)
    hubs = [t for t in threading.enumerate() if t.name == "gproxy-hub"]
    assert old.hand_over(path) == 1
    thread.join(20)
    new = started["new"]
    try:
        assert [t for t in threading.enumerate() if t.name == "gproxy-hub"] != hubs
        assert [s["client_id"] for s in new.sessions()["list"]] == ["embedded-dev"]
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
