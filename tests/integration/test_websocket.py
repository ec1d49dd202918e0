"""MQTT over WebSocket through gproxy's MQTT port: real mosquitto, paho, raw frames.

One gproxy serves raw MQTT and WebSocket clients on the same listener.  paho
with ``transport="websockets"`` (3.1.1 and 5.0) publishes and subscribes both
ways through gproxy to mosquitto over plain TCP, with messages large enough
to take several frames; chash puts a WebSocket client exactly where APISIX's
ring (an independent model) puts its id, and where a raw client with the same
id goes.  Refusals go to a route whose upstream is a recording sink, so
"nothing was forwarded" is checked at the upstream; a good client through the
same route is the positive control.  Frames come from tests/wsframes.py.
"""

import json
import re
import time
import urllib.request

import pytest

from tests import needs
from tests import packets as P
from tests import wsframes as W
from tests.integration.conftest import HOST, mqtt_route, node, wait_until
from tests.integration.helpers import ApisixRing, Paho, expect_closed, raw_session
from tests.integration.wsclient import WsBridge, WsClient

mqtt = needs.module("paho.mqtt.client", "bash scripts/venv.sh test")

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

PAIR, ONE, V5 = "127.0.0.7", "127.0.0.8", "127.0.0.9"  # client sources picking routes
PREREAD_TIMEOUT = 2
ADMIN_KEY = "edd1c9f034335f136f87ad84b625c8f1"
PROXY_TO = re.compile(r"proxy request to (\S+) while connecting to upstream, client: ")
CONNACK_OK = bytes.fromhex("20 02 00 00")


@pytest.fixture(scope="module")
def setup(module_mosquitto, module_gproxy, module_sink):
    a, b = module_mosquitto("a"), module_mosquitto("b")

    def routes(ports):
        return [
            mqtt_route([node(a), node(b)], route_id="pair", remote_addr=PAIR + "/32"),
            mqtt_route([node(a)], route_id="one", remote_addr=ONE + "/32"),
            mqtt_route([node(a)], route_id="v5", level=5, remote_addr=V5 + "/32"),
            _with_ws(mqtt_route([node(module_sink)], route_id="strict", server_port=ports[1]),
                     {"path": "/mqtt", "allow_origins": ["http://good.example"]}),
            _with_ws(mqtt_route([node(module_sink)], route_id="no-ws", server_port=ports[2]),
                     {"enable": False}),
            mqtt_route([node(module_sink)], route_id="sink"),
        ]

    gp = module_gproxy(routes, listeners=3,
                       config={"gproxy": {"preread": {"timeout": PREREAD_TIMEOUT}}})
    return gp, a, b, module_sink


def _with_ws(route, options):
    route["plugins"]["mqtt-proxy"]["websocket"] = options
    return route


def proxied_to(gp, client_port, since=0):
    line = gp.wait_for_session_line((HOST, client_port) if isinstance(client_port, int)
                                    else client_port, "proxy request to", since=since)
    return PROXY_TO.search(line).group(1)


def session_line(gp, source, port, pattern, since):
    return gp.wait_for_session_line((source, port), pattern, since=since)


def sessions(gp):
    req = urllib.request.Request("http://%s:%d/apisix/admin/gproxy/sessions" % (
        HOST, gp.admin_port), headers={"X-API-KEY": ADMIN_KEY})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read())["list"]


def ws_paho(client_id, gp, source=ONE, protocol=None, **kw):
    return Paho(client_id, gp.port, protocol, source=source, transport="websockets", **kw)


# -- paho over WebSocket, end to end -------------------------------------------------

def test_paho_websocket_311_publish_subscribe_both_ways(setup):
    gp, a, _, _ = setup
    mark = gp.mark()
    big = bytes(range(256)) * 1200  # 300 KiB: several frames each way
    with ws_paho("ws-sub", gp) as ws_sub, Paho("raw-pub", gp.port, source=ONE) as raw_pub, \
            ws_paho("ws-pub", gp) as ws_pub, Paho("raw-sub", gp.port, source=ONE) as raw_sub:
        ws_sub.subscribe("ws/t", 1)
        raw_sub.subscribe("raw/t", 1)
        raw_pub.publish("ws/t", b"raw to ws", 1)
        assert ws_sub.expect_message().payload == b"raw to ws"
        ws_pub.publish("raw/t", b"ws to raw", 1)
        assert raw_sub.expect_message().payload == b"ws to raw"
        ws_pub.publish("ws/t", big, 1)
        assert ws_sub.expect_message().payload == big
        line = session_line(gp, ONE, ws_sub.local_port, "websocket upgrade:", mark)
        assert "path=/mqtt subprotocol=mqtt mode=terminate" in line
        session_line(gp, ONE, ws_sub.local_port, "mqtt client id: ws-sub while prereading", mark)
        assert proxied_to(gp, (ONE, ws_sub.local_port), mark) == a.addr
        listed = {s["client_id"]: s for s in sessions(gp)}
        assert listed["ws-sub"]["transport"] == "ws"
        assert listed["raw-pub"]["transport"] == "tcp"
        assert listed["ws-sub"]["bytes_out"] >= len(big)  # MQTT bytes broker -> client
    a.wait_for_client("ws-sub")
    assert "(p2, c1" in a.log.wait_for("as ws-sub ")


def test_paho_websocket_v5_with_properties(setup):
    gp, a, _, _ = setup
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = [("k", "v")]
    with ws_paho("ws-v5-sub", gp, V5, mqtt.MQTTv5) as sub, \
            ws_paho("ws-v5-pub", gp, V5, mqtt.MQTTv5) as pub:
        sub.subscribe("v5/t", 1)
        pub.publish("v5/t", b"x" * 100000, 1, properties=props)
        msg = sub.expect_message()
        assert (len(msg.payload), msg.properties.UserProperty) == (100000, [("k", "v")])
    assert "(p5, c1" in a.log.wait_for("as ws-v5-sub ")


def test_raw_frames_fragmented_connect_after_a_ping(setup):
    gp, a, _, _ = setup
    with WsClient(gp.port, source=ONE) as ws:
        ws.open()
        connect = P.connect_v311("frag-1")
        ws.send(W.frame(W.PING, b"hello") + W.frame(W.BINARY, connect[:3], fin=False))
        assert ws.frame() == (True, W.PONG, b"hello")  # answered before the CONNECT is whole
        ws.send(W.frame(W.CONT, connect[3:9], fin=False) + W.frame(W.PING, b"")
                + W.frame(W.CONT, connect[9:]))
        assert ws.frame() == (True, W.PONG, b"")
        assert ws.mqtt(4)[0] == CONNACK_OK
        ws.send_mqtt(P.pingreq() + P.disconnect(), sizes=[1])
        assert ws.mqtt(2)[0] == bytes.fromhex("d0 00")
    a.wait_for_client("frag-1")


def test_large_messages_take_several_frames_towards_the_client(setup):
    gp, _, _, _ = setup
    big = b"z" * 500000
    with WsClient(gp.port, source=ONE) as ws, Paho("big-pub", gp.port, source=ONE) as pub:
        ws.open()
        ws.send_mqtt(P.connect_v311("big-sub"))
        assert ws.mqtt(4)[0] == CONNACK_OK
        ws.send_mqtt(P.packet(0x82, b"\x00\x01" + P.encode_string("big/t") + b"\x00"))
        assert ws.mqtt(5)[0] == bytes.fromhex("90 03 00 01 00")
        pub.publish("big/t", big, 1)
        publish = P.publish("big/t", big)
        got, frames = ws.mqtt(len(publish))
        assert got == publish
        assert frames > 1


# -- chash ----------------------------------------------------------------------------

def test_chash_websocket_clients_stick_and_match_raw_clients(setup):
    gp, a, b, _ = setup
    ring = ApisixRing([(a.host, a.port, 1), (b.host, b.port, 1)])
    ids = ["ws-sticky-%d" % i for i in range(8)]
    seen = {}
    for client_id in ids:
        for transport in ("ws", "raw", "ws"):
            mark = gp.mark()
            if transport == "raw":
                port = raw_session(gp.port, client_id, source=PAIR)
            else:
                with ws_paho(client_id, gp, PAIR) as c:
                    port = c.local_port
            seen.setdefault(client_id, []).append(proxied_to(gp, (PAIR, port), mark))
    expected = {cid: [ring.pick(cid)] * 3 for cid in ids}
    assert seen == expected
    assert {v[0] for v in expected.values()} == {a.addr, b.addr}, "pick ids that spread"


def test_empty_client_id_falls_back_to_the_client_address(setup):
    gp, a, b, _ = setup
    expected = ApisixRing([(a.host, a.port, 1), (b.host, b.port, 1)]).pick(PAIR)
    mark = gp.mark()
    with WsClient(gp.port, source=PAIR) as ws:
        ws.open()
        ws.send_mqtt(P.connect_v311(""))
        assert ws.mqtt(4)[0][:2] == b"\x20\x02"
        assert proxied_to(gp, (PAIR, ws.local_port), mark) == expected
        session_line(gp, PAIR, ws.local_port, "chash_key fetch is nil", mark)


# -- refusals: nothing reaches the upstream -----------------------------------------------

def refused(setup, send, expect, log_line, port_index=0):
    """Run ``send(WsClient)``; ``expect(ws)`` checks the answer; then a silent sink."""
    gp, _, _, sink = setup
    before = sink.count()
    mark = gp.mark()
    ws = WsClient(gp.ports[port_index], request=b"")
    try:
        send(ws)
        expect(ws)
        assert expect_closed(ws.sock) in ("eof", "reset")
    finally:
        ws.close()
    gp.wait_for_session_line(ws.local_port, log_line, since=mark)
    # the session is over (closed, logged): any dial it made reached the sink's accept
    # queue before now, and settle() counts what came through that queue before its probe
    assert sink.settle() == before, "a refused client reached the upstream"
    assert not [ln for ln in gp.session_lines(ws.local_port, mark) if "proxy request to" in ln]


def _status(code, header=None):
    def check(ws):
        status, headers = ws.handshake()
        assert status == code, (status, headers)
        if header:
            assert headers[header[0]] == header[1]
    return check


def _open_then_close(code):
    def check(ws):
        ws.open()
        ws.expect_close(code)
    return check


def _upgrade(**kw):
    def send(ws):
        ws.send(W.upgrade_request(**dict({"key": ws.key}, **kw)))
    return send


def _then(*chunks, **kw):
    def send(ws):
        ws.send(W.upgrade_request(**dict({"key": ws.key}, **kw)) + b"".join(chunks))
    return send


HTTP_REFUSALS = {
    "malformed-request-line": (lambda ws: ws.send(b"GET /mqtt\r\n\r\n"), _status(400),
                               "websocket handshake refused: 400 Bad Request: malformed"),
    "plain-get": (lambda ws: ws.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
                  _status(426, ("upgrade", "websocket")), "426 Upgrade Required"),
    "version-8": (_upgrade(version="8"), _status(426, ("sec-websocket-version", "13")),
                  "unsupported Sec-WebSocket-Version: 8"),
    "bad-key": (_upgrade(key="c2hvcnQ="), _status(400), "invalid Sec-WebSocket-Key"),
    "wrong-subprotocol": (_upgrade(protocols="chat"), _status(400), "no MQTT subprotocol"),
    "head-too-large": (_upgrade(extra=[("Cookie", "c" * 20000)]), _status(431),
                       "431 Request Header Fields Too Large"),
}


@pytest.mark.parametrize("name", HTTP_REFUSALS)
def test_http_refusals(setup, name):
    send, expect, line = HTTP_REFUSALS[name]
    refused(setup, send, expect, line)


def test_route_path_and_origin_options(setup):
    refused(setup, _upgrade(path="/other"), _status(404), "404 Not Found: path /other", 1)
    refused(setup, _upgrade(origin="http://evil.example"), _status(403),
            "403 Forbidden: origin http://evil.example not allowed", 1)
    # the good path and origin reach the route's upstream (positive control)
    gp, _, _, sink = setup
    before = sink.count()
    with WsClient(gp.ports[1], path="/mqtt?x=1", origin="http://good.example") as ws:
        ws.open()
        ws.send_mqtt(P.connect_v311("strict-ok"))
        conn = sink.wait_for_connection(before)
        P.assert_packet(conn.wait_for_bytes(len(P.connect_v311("strict-ok"))),
                        P.connect_v311("strict-ok"), "CONNECT unwrapped for the broker")


def test_websocket_disabled_route_treats_get_as_bad_mqtt(setup):
    refused(setup, _upgrade(), lambda ws: None,
            "Received unexpected MQTT packet type+flags: 71", 2)


BIG_FRAME = W.binary(b"\x10" + b"\xff" * 17000)
FRAME_REFUSALS = {
    "text-frame": (_then(W.frame(W.TEXT, b"CONNECT")), 1003, "text frame"),
    "oversize-frame": (_then(BIG_FRAME[:8]), 1009, "frame of 17001 bytes (limit 16384)"),
    "unmasked-frame": (_then(W.binary(P.connect_v311("x"), mask=None)), 1002,
                       "client frame not masked"),
    "reserved-bits": (_then(W.frame(W.BINARY, b"\x10", rsv=4)), 1002, "reserved bits"),
    "lone-continuation": (_then(W.frame(W.CONT, b"\x10")), 1002, "continuation frame"),
    "bad-connect": (_then(W.binary(P.connect_v5("v5-on-v4"))), 1008,
                    "expect protocol level: 4, but got 5"),
    "bad-first-byte": (_then(W.binary(b"\x30\x00")), 1008,
                       "Received unexpected MQTT packet type+flags: 48"),
    "connect-too-large": (_then(W.fragments(P.connect_v311("big" * 6000), [8000, 8000])), 1009,
                          "preread buffer full"),
    "ping-flood": (_then(*[W.frame(W.PING, b"p" * 100)] * 400), 1009,
                   "bytes of frames before a whole CONNECT"),
    "client-close": (_then(W.binary(P.connect_v311("c")[:5]), W.close(1001)), 1001,
                     "failed to read the Connect Command: closed"),
}


@pytest.mark.parametrize("name", FRAME_REFUSALS)
def test_frame_refusals(setup, name):
    send, code, line = FRAME_REFUSALS[name]

    def expect(ws):
        ws.open()
        while True:  # pings sent before the refusal are answered
            fin, opcode, payload = ws.frame()
            if opcode != W.PONG:
                break
        assert (opcode, W.close_code(payload)) == (W.CLOSE, code), (opcode, payload[:40])

    refused(setup, send, expect, line)


@pytest.mark.parametrize("stall", ["in-http-head", "after-101", "mid-connect"])
def test_stalls_are_closed_within_the_preread_deadline(setup, stall):
    send = {"in-http-head": lambda ws: ws.send(W.upgrade_request(key=ws.key)[:30]),
            "after-101": _then(),
            "mid-connect": _then(W.binary(P.connect_v311("s")[:6]))}[stall]
    line = {"in-http-head": "failed to read the websocket upgrade request: timeout",
            "after-101": "failed to read the msg header: timeout",
            "mid-connect": "failed to read the Connect Command: timeout"}[stall]

    def expect(ws):
        started = time.monotonic()
        if stall != "in-http-head":
            ws.open()
            ws.expect_close(1008)
        assert time.monotonic() - started < PREREAD_TIMEOUT + 2

    refused(setup, send, expect, line)


def test_a_good_client_still_works_after_the_refusals(setup):
    gp, a, _, _ = setup
    with ws_paho("after-refusals", gp) as c:
        c.subscribe("after/t")
    a.wait_for_client("after-refusals")


# -- ending sessions ----------------------------------------------------------------------

def test_disconnect_from_the_admin_api_sends_close_1001(setup):
    gp, a, _, _ = setup
    with WsClient(gp.port, source=ONE) as ws:
        ws.open()
        ws.send_mqtt(P.connect_v311("to-disconnect"))
        assert ws.mqtt(4)[0] == CONNACK_OK
        sid = wait_until(lambda: [s["id"] for s in sessions(gp)
                                  if s["client_id"] == "to-disconnect"], 5)[0]
        req = urllib.request.Request("http://%s:%d/apisix/admin/gproxy/sessions/%s" % (
            HOST, gp.admin_port, sid), method="DELETE", headers={"X-API-KEY": ADMIN_KEY})
        urllib.request.urlopen(req, timeout=5).close()
        ws.expect_close(1001)
        assert expect_closed(ws.sock) in ("eof", "reset")


def test_broker_closing_sends_close_1000_and_client_close_reaches_the_broker(setup):
    gp, a, _, _ = setup
    with WsClient(gp.port, source=ONE) as first:
        first.open()
        first.send_mqtt(P.connect_v311("taken-over"))
        assert first.mqtt(4)[0] == CONNACK_OK
        mark = a.log.mark()
        raw_session(gp.port, "taken-over", source=ONE)  # mosquitto drops the first one
        first.expect_close(1000)
        first.send(W.close(1000))
        assert expect_closed(first.sock) == "eof"
    with WsClient(gp.port, source=ONE) as ws:
        ws.open()
        ws.send_mqtt(P.connect_v311("closes-itself"))
        assert ws.mqtt(4)[0] == CONNACK_OK
        mark = a.log.mark()
        ws.send(W.close(1000, b"done"))
        assert ws.frame() == (True, W.CLOSE, b"\x03\xe8")  # echoed (RFC 6455 §5.5.1)
        a.log.wait_for(re.compile(r"Client closes-itself (closed its connection|disconnected)"),
                       since=mark)


# -- passthrough to a broker's WebSocket listener ------------------------------------------

@pytest.fixture
def passthrough(mosquitto, gproxy):
    broker = mosquitto("behind-bridge")
    bridge = WsBridge(broker.port)
    route = _with_ws(mqtt_route([{"host": HOST, "port": bridge.port, "weight": 1}]),
                     {"mode": "passthrough"})
    gp = gproxy([route])
    yield gp, bridge, broker
    bridge.close()


def test_passthrough_replays_the_upgrade_and_frames_unchanged(passthrough):
    gp, bridge, broker = passthrough
    mark = gp.mark()
    connect = P.connect_v311("through-1")
    frames = W.frame(W.PING, b"p") + W.fragments(connect, [4])
    with WsClient(gp.port) as ws:
        ws.open()
        ws.send(frames)
        got = []
        while len(got) < 2:
            got.append(ws.frame())
        assert (True, W.PONG, b"p") in got  # the bridge's pong, passed through
        assert (True, W.BINARY, CONNACK_OK) in got
        assert bridge.requests[0] == W.upgrade_request(key=ws.key)
        assert bytes(bridge.client_bytes[0]).startswith(frames)  # byte for byte
        gp.wait_for_session_line(ws.local_port, "mode=passthrough", since=mark)
        gp.wait_for_session_line(ws.local_port, "mqtt client id: through-1", since=mark)
    broker.wait_for_client("through-1")


def test_passthrough_with_paho_both_ways(passthrough):
    gp, bridge, broker = passthrough
    with Paho("pt-sub", gp.port, transport="websockets") as sub, \
            Paho("pt-pub", gp.port, transport="websockets") as pub:
        sub.subscribe("pt/t", 1)
        pub.publish("pt/t", b"q" * 200000, 1)
        assert sub.expect_message().payload == b"q" * 200000


def test_passthrough_broker_refusing_the_upgrade_gets_close_1014(gproxy, sink):
    route = _with_ws(mqtt_route([node(sink)]), {"mode": "passthrough"})
    gp = gproxy([route])
    mark = gp.mark()
    with WsClient(gp.port) as ws:
        ws.open()
        ws.send_mqtt(P.connect_v311("pt-refused"))
        conn = sink.wait_for_connection(0)
        conn.wait_for_bytes(len(W.upgrade_request(key=ws.key)))
        conn.send(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        ws.expect_close(1014)
    gp.wait_for_session_line(ws.local_port, "websocket upgrade with the broker failed: "
                             "broker refused the upgrade: HTTP/1.1 400", since=mark)
    assert conn.data == W.upgrade_request(key=ws.key)  # no frame went before the 101


def test_close_right_behind_the_connect_is_echoed_after_the_connect_went_through(setup):
    gp, a, _, _ = setup
    with WsClient(gp.port, source=ONE) as ws:
        ws.open()
        ws.send(W.binary(P.connect_v311("hit-and-run")) + W.close(1000, b"bye"))
        assert ws.frame() == (True, W.CLOSE, b"\x03\xe8")  # no data frame after our Close
        assert expect_closed(ws.sock) == "eof"
    a.wait_for_client("hit-and-run")
