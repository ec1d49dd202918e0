"""MQTT end to end through gproxy: real mosquitto brokers, paho clients.

Covers the three protocol versions APISIX's mqtt-proxy accepts (3.1 / 3.1.1 / 5.0),
chash stickiness and spread over two brokers against an independent model of
APISIX's ring (docs/apisix-behaviour.md §5.3), the empty-client-id fallback to
``remote_addr``, hot apply of hand edits to apisix.yaml (and refusal of a broken
one), retrying the next node when one is down, and a broker-side close reaching
the client.  Raw-socket cases (rejections, replay, half-close) are in
test_proxy_raw.py.
"""

import re
import socket
import time

import pytest

from tests import needs, packets
from tests.integration.conftest import HOST, mqtt_route, node, wait_until
from tests.integration.helpers import ApisixRing, Paho, dial, raw_session, recv_exact

mqtt = needs.module("paho.mqtt.client", "bash scripts/venv.sh test")
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

PROXY_TO = re.compile(r"proxy request to (\S+) while connecting to upstream, client: ")


def proxied_to(gp, client_port, since=0):
    """The node gproxy connected the session of ``client_port`` to."""
    line = gp.wait_for_session_line(client_port, "proxy request to", since=since)
    return PROXY_TO.search(line).group(1)


def ring_of(*brokers):
    return ApisixRing([(b.host, b.port, 1) for b in brokers])


# -- the reference ring itself -----------------------------------------------------

def test_reference_ring_reproduces_the_spec_check_values():
    """Our independent ring gives the node choices APISIX's own tests expect (§5.3)."""
    ring = ApisixRing([("0.0.0.0", 1995, 1), ("127.0.0.1", 1995, 1)])
    expected = {"f": "0.0.0.0:1995", "g": "127.0.0.1:1995", "127.0.0.1": "127.0.0.1:1995",
                "foo": "0.0.0.0:1995", "clint-111": "127.0.0.1:1995",
                "client-1": "127.0.0.1:1995", "client-2": "0.0.0.0:1995"}
    assert {key: ring.pick(key) for key in expected} == expected


# -- protocol versions ---------------------------------------------------------------

@pytest.mark.parametrize("qos", [0, 1])
def test_mqtt311_publish_subscribe_end_to_end(mosquitto, gproxy, qos):
    broker = mosquitto()
    gp = gproxy([mqtt_route([node(broker)], level=4)])
    mark = gp.mark()
    with Paho("sub-311", gp.port) as sub, Paho("pub-311", gp.port) as pub:
        sub.subscribe("gp/t311", qos)
        pub.publish("gp/t311", b"hello 3.1.1", qos)
        msg = sub.expect_message()
        assert (msg.topic, msg.payload, msg.qos) == ("gp/t311", b"hello 3.1.1", qos)
        for client in (sub, pub):
            gp.wait_for_session_line(client.local_port, "mqtt client id: %s while prereading client data," % (
                client.client._client_id.decode()), since=mark)
            assert proxied_to(gp, client.local_port, mark) == broker.addr
    assert {"sub-311", "pub-311"} <= set(broker.client_ids())
    assert "(p2, c1" in broker.log.wait_for("as sub-311 ")


def test_mqtt5_with_properties_end_to_end(mosquitto, gproxy):
    broker = mosquitto()
    gp = gproxy([mqtt_route([node(broker)], level=5)])
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 30
    props.UserProperty = ("origin", "gproxy-test")
    with Paho("sub-v5", gp.port, mqtt.MQTTv5, connect_properties=props) as sub, \
            Paho("pub-v5", gp.port, mqtt.MQTTv5) as pub:
        sub.subscribe("gp/t5", 1)
        pub_props = Properties(PacketTypes.PUBLISH)
        pub_props.UserProperty = [("k", "v"), ("trace", "42")]
        pub_props.ContentType = "text/plain"
        pub.publish("gp/t5", b"hello 5", 1, properties=pub_props)
        msg = sub.expect_message()
        assert (msg.topic, msg.payload) == ("gp/t5", b"hello 5")
        assert msg.properties.UserProperty == [("k", "v"), ("trace", "42")]
        assert msg.properties.ContentType == "text/plain"
        gp.wait_for_session_line(sub.local_port, "mqtt client id: sub-v5 while prereading client data,")
    assert "(p5, c1" in broker.log.wait_for("as sub-v5 ")


def test_mqtt31_mqisdp_end_to_end(mosquitto, gproxy):
    broker = mosquitto()
    gp = gproxy([mqtt_route([node(broker)], level=3, name="MQIsdp")])
    with Paho("sub-31", gp.port, mqtt.MQTTv31) as sub, Paho("pub-31", gp.port, mqtt.MQTTv31) as pub:
        sub.subscribe("gp/t31", 1)
        pub.publish("gp/t31", b"hello 3.1", 1)
        assert sub.expect_message().payload == b"hello 3.1"
        gp.wait_for_session_line(sub.local_port, "mqtt client id: sub-31 while prereading client data,")
    assert "(p1, c1" in broker.log.wait_for("as sub-31 ")


# -- chash over two brokers ------------------------------------------------------------

@pytest.fixture
def two_brokers(mosquitto):
    return mosquitto("a"), mosquitto("b")


def test_chash_same_client_id_sticks_to_one_broker(two_brokers, gproxy):
    a, b = two_brokers
    gp = gproxy([mqtt_route([node(a), node(b)])])
    by_addr = {a.addr: a, b.addr: b}
    for client_id in ("sticky-1", "sticky-2", "sticky-3"):
        expected = ring_of(a, b).pick(client_id)
        other = b if expected == a.addr else a
        seen = []
        for _ in range(4):
            mark = gp.mark()
            with Paho(client_id, gp.port) as client:
                seen.append(proxied_to(gp, client.local_port, mark))
        assert seen == [expected] * 4, client_id
        by_addr[expected].wait_for_client(client_id)
        assert wait_until(lambda: by_addr[expected].client_ids().count(client_id) == 4, 5)
        assert client_id not in other.client_ids()


@pytest.mark.parametrize("weights", [(1, 1), (2, 4)], ids=["w1-1", "w2-4"])
def test_chash_spreads_ids_exactly_like_apisix_ring(two_brokers, gproxy, weights):
    a, b = two_brokers
    gp = gproxy([mqtt_route([node(a, weights[0]), node(b, weights[1])])])
    ring = ApisixRing([(a.host, a.port, weights[0]), (b.host, b.port, weights[1])])
    ids = ["spread-%02d" % i for i in range(40)]
    for client_id in ids:
        raw_session(gp.port, client_id)
    expected = {cid: ring.pick(cid) for cid in ids}
    for broker in (a, b):
        want = sorted(cid for cid in ids if expected[cid] == broker.addr)
        assert want, "the model puts no id on %s: pick other ids" % broker.addr
        assert wait_until(lambda: sorted(broker.client_ids()) == want, 5), (
            "broker %s got %s, the APISIX ring says %s"
            % (broker.name, sorted(broker.client_ids()), want))


def test_empty_client_id_falls_back_to_remote_addr(two_brokers, gproxy):
    a, b = two_brokers
    gp = gproxy([mqtt_route([node(a), node(b)])])
    expected = ring_of(a, b).pick("127.0.0.1")
    mark = gp.mark()
    with Paho("", gp.port, clean_session=True) as client:
        client.subscribe("gp/anon", 1)
        client.publish("gp/anon", b"anonymous", 1)
        assert client.expect_message().payload == b"anonymous"
        port = client.local_port
        gp.wait_for_session_line(port, "mqtt client id:  while prereading client data, client: 127.0.0.1, server: ", since=mark)
        line = gp.wait_for_session_line(
            port, "chash_key fetch is nil, use default chash_key remote_addr: 127.0.0.1 while connecting to upstream,",
            since=mark)
        assert "[warn]" in line
        assert proxied_to(gp, port, mark) == expected
    target = a if expected == a.addr else b
    other = b if target is a else a
    assert wait_until(lambda: any(c.startswith("auto-") for c in target.client_ids()), 5)
    assert other.client_ids() == []


# -- hot apply of hand edits ------------------------------------------------------------

def _lands_on(gp, broker, client_id, since):
    """Open a raw session; True once ``broker`` has logged ``client_id``."""
    try:
        raw_session(gp.port, client_id)
    except (AssertionError, OSError):
        return False
    return wait_until(lambda: client_id in broker.client_ids(since), 1.0) is not None


def test_hot_apply_moves_new_sessions_and_keeps_live_ones(two_brokers, gproxy):
    a, b = two_brokers
    gp = gproxy([mqtt_route([node(a)])])
    with Paho("old-1", gp.port) as old:
        old.subscribe("gp/hot", 1)
        a.wait_for_client("old-1")

        # 1. point the route at broker b
        b_mark = b.log.mark()
        gp.rewrite_routes([mqtt_route([node(b)])])
        start = time.monotonic()
        probes = iter("probe-%d" % i for i in range(40))
        moved = wait_until(lambda: _lands_on(gp, b, next(probes), b_mark), 6, interval=0.2)
        elapsed = time.monotonic() - start
        assert moved and elapsed < 3.5, "new sessions reached b after %.1fs" % elapsed

        a_mark = a.log.mark()
        old.publish("gp/hot", b"still on a", 1)
        assert old.expect_message().payload == b"still on a"
        a.log.wait_for("Received PUBLISH from old-1", since=a_mark)
        assert "old-1" not in b.client_ids()

        # 2. delete every route: new sessions are refused, the live one goes on
        mark = gp.mark()
        gp.rewrite_routes([])
        start = time.monotonic()

        def refused():
            sock = dial(gp.port)
            try:
                sock.sendall(packets.connect_v311("late"))
                return sock.recv(16) == b""
            except ConnectionResetError:
                return True
            finally:
                sock.close()
        assert wait_until(refused, 6, interval=0.2), "route deletion never took effect"
        assert time.monotonic() - start < 3.5
        gp.wait_for_log("not hit any route", since=mark)

        old.publish("gp/hot", b"after delete", 1)
        assert old.expect_message().payload == b"after delete"
        assert not old.disconnected.is_set()


def test_broken_edit_is_ignored_and_a_fixed_one_applies(two_brokers, gproxy):
    a, b = two_brokers
    gp = gproxy([mqtt_route([node(a)])])
    mark = gp.mark()
    body = "stream_routes:\n  - id: 1\n    upstream:\n      nodes: {\"%s\": 1}\n" % b.addr
    gp.write_routes_text(body)  # no #END line: an editor still writing, say
    # wait for the store's poll to see the edit and refuse it (APISIX's wording)
    gp.wait_for_log("store: ignoring edit of %s: missing valid end flag in file %s"
                    % (gp.routes_path, gp.routes_path), since=mark)
    raw_session(gp.port, "while-broken")
    a.wait_for_client("while-broken")
    gp.write_routes_text(body + "#END\n")
    b_mark = b.log.mark()
    probes = iter("fixed-%d" % i for i in range(40))
    assert wait_until(lambda: _lands_on(gp, b, next(probes), b_mark), 6, interval=0.2)


# -- retry on a dead node -----------------------------------------------------------------

def test_roundrobin_retries_next_node_when_first_is_down(mosquitto, gproxy):
    broker = mosquitto()
    dead = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    dead.bind((HOST, 0))  # bound, never listening: connect() is refused
    try:
        dead_port = dead.getsockname()[1]
        gp = gproxy([mqtt_route([node(dead_port), node(broker)], type_="roundrobin")])
        ports = []
        for i in range(4):
            with Paho("rr-%d" % i, gp.port) as client:
                client.subscribe("gp/rr", 0)
                client.publish("gp/rr", b"x", 0)
                assert client.expect_message().payload == b"x"
                ports.append(client.local_port)
        for port in ports:
            assert proxied_to(gp, port) in (broker.addr, "%s:%d" % (HOST, dead_port))
            gp.wait_for_session_line(port, "session closed: node=%s " % broker.addr)
        line = gp.wait_for_log("connect() failed")
        assert "%s:%d" % (HOST, dead_port) in line
        assert sorted(broker.client_ids()) == ["rr-%d" % i for i in range(4)]
    finally:
        dead.close()


def test_chash_retries_along_the_ring_when_the_picked_node_is_down(mosquitto, gproxy):
    broker = mosquitto()
    dead = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    dead.bind((HOST, 0))
    try:
        dead_addr = "%s:%d" % dead.getsockname()
        ring = ApisixRing([(HOST, dead.getsockname()[1], 1), (broker.host, broker.port, 1)])
        unlucky = [cid for cid in ("ring-%d" % i for i in range(200))
                   if ring.pick(cid) == dead_addr][:3]
        assert len(unlucky) == 3
        gp = gproxy([mqtt_route([node(dead.getsockname()[1]), node(broker)])])
        for client_id in unlucky:
            mark = gp.mark()
            port = raw_session(gp.port, client_id)
            assert proxied_to(gp, port, mark) == dead_addr  # the ring's first choice
            gp.wait_for_session_line(port, "connect() failed", since=mark)
            gp.wait_for_session_line(port, "proxy request to %s while connecting to upstream," % broker.addr, since=mark)
            broker.wait_for_client(client_id)
    finally:
        dead.close()


def test_raw_connect_then_publish_in_one_segment_reaches_broker(mosquitto, gproxy):
    """CONNECT + PUBLISH in one sendall: the bytes after the CONNECT are replayed."""
    broker = mosquitto()
    gp = gproxy([mqtt_route([node(broker)])])
    with Paho("watcher", broker.port) as watcher:  # directly on the broker
        watcher.subscribe("gp/replay", 0)
        sock = dial(gp.port)
        try:
            sock.sendall(packets.connect_v311("burst")
                         + packets.publish("gp/replay", b"in the same segment"))
            packets.assert_packet(recv_exact(sock, 4), bytes.fromhex("20 02 00 00"), "CONNACK")
            msg = watcher.expect_message()
            assert (msg.topic, msg.payload) == ("gp/replay", b"in the same segment")
            sock.sendall(packets.disconnect())
        finally:
            sock.close()


def test_broker_closing_the_session_reaches_the_client(mosquitto, gproxy):
    """Session takeover: mosquitto drops the first client; its EOF gets through gproxy."""
    broker = mosquitto()
    gp = gproxy([mqtt_route([node(broker)])])
    with Paho("twin", gp.port) as first:
        first_port = first.local_port
        with Paho("twin", gp.port) as second:
            assert first.disconnected.wait(5), "the broker's close never reached the client"
            second.subscribe("gp/twin", 1)
            second.publish("gp/twin", b"the survivor", 1)
            assert second.expect_message().payload == b"the survivor"
        gp.wait_for_session_line(first_port, "session closed: node=%s " % broker.addr)
