"""The PROXY protocol through gproxy: headers in from a front load balancer
(hand-built by tests/wire.py), headers out to a fake broker that checks them,
and the ``mqtt_username`` chash key sticky over two brokers.
"""

import json
import socket
import time

import pytest

from tests import packets, wire
from tests.integration.conftest import HOST, mqtt_route, node, wait_listening, wait_until
from tests.integration.helpers import (CONNACK_OK, WAIT, ApisixRing, dial, expect_closed, http_call,
                                       recv_exact)

KEY = "edd1c9f034335f136f87ad84b625c8f1"


def listeners(**flags):
    def config(ports):
        return {"apisix": {"stream_proxy": {"tcp": [
            dict(flags, addr="%s:%d" % (HOST, p)) for p in ports]}}}
    return config


def sessions(proxy):
    wait_listening(proxy.admin_port, proxy.proc, what="gproxy admin")
    return json.loads(http_call(proxy.admin_port, "GET", "/apisix/admin/gproxy/sessions",
                                headers={"X-API-KEY": KEY})[1])["list"]


def mqtt_through(port, header, client_id):
    sock = dial(port)
    sock.sendall(header + packets.connect_v311(client_id))
    packets.assert_packet(recv_exact(sock, 4), CONNACK_OK, "CONNACK")
    return sock


@pytest.mark.parametrize("header,client,port", [
    (wire.proxy_v1("203.0.113.7", "127.0.0.1", 40001, 8883), "203.0.113.7", 40001),
    (wire.proxy_v2("203.0.113.8", "127.0.0.1", 40002, 8883), "203.0.113.8", 40002),
    (wire.proxy_v2("2001:db8::9", "::1", 40003, 8883,
                   tlvs=wire.tlv(0x04, b"\x00" * 8)), "2001:db8::9", 40003),
], ids=["v1", "v2", "v2-ipv6-tlv"])
def test_proxy_header_in_gives_the_client_address(gproxy, mosquitto, header, client, port):
    broker = mosquitto()
    net = "2001:db8::/32" if ":" in client else "203.0.113.0/24"
    proxy = gproxy([mqtt_route([node(broker)], type_="roundrobin", remote_addr=net)],
                   config=listeners(proxy_protocol=True))
    sock = mqtt_through(proxy.port, header, "behind-lb")
    broker.wait_for_client("behind-lb")
    live = sessions(proxy)
    assert [(s["client_addr"], s["client_port"]) for s in live] == [(client, port)]
    line = proxy.wait_for_log("mqtt client id: behind-lb")
    assert "client: %s," % client in line
    sock.close()


def test_v2_local_keeps_the_real_address_and_no_header_is_refused(gproxy, mosquitto):
    broker = mosquitto()
    proxy = gproxy([mqtt_route([node(broker)], type_="roundrobin")],
                   config=listeners(proxy_protocol=True))
    mqtt_through(proxy.port, wire.proxy_v2_local(), "health").close()
    broker.wait_for_client("health")
    assert "client: 127.0.0.1," in proxy.wait_for_log("mqtt client id: health")
    mark = proxy.mark()
    sock = dial(proxy.port)
    sock.sendall(packets.connect_v311(b"no-header"))
    expect_closed(sock)
    sock.close()
    line = proxy.wait_for_log("broken header", since=mark)
    assert "while reading PROXY protocol" in line and "\\x10" in line
    assert "no-header" not in broker.client_ids()


def test_split_header_and_slow_front(gproxy, mosquitto):
    broker = mosquitto()
    proxy = gproxy([mqtt_route([node(broker)], type_="roundrobin")],
                   config=listeners(proxy_protocol=True))
    header = wire.proxy_v1("198.51.100.20", "127.0.0.1", 5555, 8883)
    sock = dial(proxy.port)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for i in range(0, len(header), 7):  # the header arrives in pieces
        sock.sendall(header[i:i + 7])
        time.sleep(0.02)  # separate segments (nothing is checked after the pause)
    sock.sendall(packets.connect_v311(b"pieces"))
    packets.assert_packet(recv_exact(sock, 4), CONNACK_OK, "CONNACK")
    sock.close()
    assert "client: 198.51.100.20," in proxy.wait_for_log("mqtt client id: pieces")


@pytest.mark.parametrize("version", [1, 2])
def test_proxy_header_out_reaches_the_broker_before_the_connect(gproxy, sink, version):
    proxy = gproxy([mqtt_route([node(sink)], type_="roundrobin")], config=lambda ports: dict(
        listeners(proxy_protocol=True, proxy_protocol_to_upstream=True)(ports),
        gproxy={"proxy_protocol": {"upstream_version": version}}))
    sock = dial(proxy.port)
    sock.sendall(wire.proxy_v1("192.0.2.50", "10.0.0.1", 6000, 8883)
                 + packets.connect_v311(b"pp-out"))
    conn = sink.wait_for_connection()
    want = (wire.proxy_v1 if version == 1 else wire.proxy_v2)(
        "192.0.2.50", HOST, 6000, proxy.port)
    data = conn.wait_for_bytes(len(want) + 17)
    packets.assert_packet(data, want + packets.connect_v311(b"pp-out"), "header + CONNECT")
    sock.close()


def test_proxy_header_out_on_a_plain_tcp_route(gproxy, sink):
    proxy = gproxy([{"id": 1, "upstream": {"type": "roundrobin", "nodes": [node(sink)]}}],
                   config=listeners(proxy_protocol_to_upstream=True))
    sock = dial(proxy.port)
    conn = sink.wait_for_connection()
    want = wire.proxy_v1(HOST, HOST, sock.getsockname()[1], proxy.port)
    packets.assert_packet(conn.wait_for_bytes(len(want)), want, "PROXY header")
    sock.sendall(b"hello")
    assert conn.wait_for_bytes(len(want) + 5) == want + b"hello"
    sock.close()


def test_username_hashing_is_sticky_over_two_brokers(gproxy, mosquitto):
    a, b = mosquitto("a"), mosquitto("b")
    nodes = [node(a), node(b)]
    upstream = {"id": 1, "type": "chash", "key": "mqtt_username", "nodes": nodes}
    proxy = gproxy([{"id": 1, "upstream_id": 1,
                     "plugins": {"mqtt-proxy": {"protocol_level": 4}}}], [upstream])
    ring = ApisixRing([(HOST, a.port, 1), (HOST, b.port, 1)])
    brokers = {a.addr: a, b.addr: b}
    users = ring.spread("user", 3)  # three users per broker, for the ports in use
    for user in users:
        for n in range(3):
            cid = "%s-device-%d" % (user, n)
            sock = dial(proxy.port)
            sock.sendall(packets.connect_v311(cid, username=user, password=b"pw-never-logged"))
            packets.assert_packet(recv_exact(sock, 4), CONNACK_OK, "CONNACK")
            sock.sendall(packets.disconnect())
            sock.close()
            brokers[ring.pick(user)].wait_for_client(cid)
    for user in users:
        other = a if ring.pick(user) == b.addr else b
        assert not [c for c in other.client_ids() if c.startswith(user + "-")]
    assert "pw-never-logged" not in proxy.log()
    # no username: the client address, as APISIX falls back for an unset variable
    sock = dial(proxy.port)
    sock.sendall(packets.connect_v311(b"anonymous"))
    packets.assert_packet(recv_exact(sock, 4), CONNACK_OK, "CONNACK")
    sock.close()
    brokers[ring.pick(HOST)].wait_for_client("anonymous")
    assert wait_until(lambda: proxy.find("chash_key fetch is nil"), WAIT)
