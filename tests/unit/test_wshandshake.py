"""gproxy.protocols.wshandshake against RFC 6455 §4 and MQTT §6.

Requests come from tests/wsframes.py (an independent builder).  Good requests
are fed whole, byte by byte and in seeded random splits; refusals carry the
HTTP status RFC 6455 asks for; Hypothesis checks that any bytes only ever give
"need more", a request, or HandshakeError, and that a verdict never changes
once given as more bytes arrive.
"""

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gproxy.errors import HandshakeError
from gproxy.protocols import wshandshake as H
from tests import wsframes as W

FUZZ = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])

GOOD = {
    "rfc-example": (W.upgrade_request(path="/chat", protocols="mqtt"), "/chat", "mqtt"),
    "mqtt.js": (W.upgrade_request(path="/mqtt?x=1", protocols="mqtt",
                                  origin="http://127.0.0.1:8000",
                                  extra=[("User-Agent", "Mozilla/5.0"),
                                         ("Sec-WebSocket-Extensions",
                                          "permessage-deflate; client_max_window_bits")]),
                "/mqtt", "mqtt"),
    "mqtt31": (W.upgrade_request(protocols="mqttv3.1"), "/mqtt", "mqttv3.1"),
    "two-offered": (W.upgrade_request(protocols="chat, mqttv3.1, mqtt"), "/mqtt", "mqttv3.1"),
    "two-lines": (W.upgrade_request(protocols="chat", extra=[("Sec-WebSocket-Protocol", "mqtt")]),
                  "/mqtt", "mqtt"),
    "none-offered": (W.upgrade_request(protocols=None), "/mqtt", None),
    "case-and-lists": (W.upgrade_request(extra=[("UPGRADE", "h2c")], drop=("connection",))
                       .replace(b"Upgrade: websocket", b"upgrade: WebSocket")
                       .replace(b"\r\n\r\n", b"\r\nconnection: keep-alive, Upgrade\r\n\r\n"),
                       "/mqtt", "mqtt"),
    "absolute-form": (W.upgrade_request(path="ws://broker.example:80/mqtt?a"), "/mqtt", "mqtt"),
    "bare-lf": (W.upgrade_request(eol="\n"), "/mqtt", "mqtt"),
    "http-1.2": (W.upgrade_request(http="HTTP/1.2"), "/mqtt", "mqtt"),
    "content-length-0": (W.upgrade_request(extra=[("Content-Length", "0")]), "/mqtt", "mqtt"),
}


def check_good(req, data, path, protocol):
    assert isinstance(req, H.UpgradeRequest), req
    assert req.path == path
    assert req.protocol == protocol
    assert req.length == len(data)
    assert req.key == W.RFC_KEY


@pytest.mark.parametrize("name", GOOD)
def test_whole(name):
    data, path, protocol = GOOD[name]
    check_good(H.parse_upgrade(data), data, path, protocol)
    # frames the client pipelined after the head are left alone
    check_good(H.parse_upgrade(data + W.binary(b"\x10\x00")), data, path, protocol)


@pytest.mark.parametrize("name", GOOD)
def test_byte_by_byte(name):
    data, path, protocol = GOOD[name]
    for n in range(1, len(data)):
        assert H.parse_upgrade(data[:n]) is None, "need-more expected at %d bytes" % n
    check_good(H.parse_upgrade(data), data, path, protocol)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("name", GOOD)
def test_random_splits(name, seed):
    data, path, protocol = GOOD[name]
    rng = random.Random("%s/%d" % (name, seed))
    buf = b""
    pos = 0
    while pos < len(data):
        step = rng.randint(1, 40)
        buf += data[pos:pos + step]
        pos += step
        got = H.parse_upgrade(buf)
        if pos < len(data):
            assert got is None
    check_good(got, data, path, protocol)


def test_accept_key_is_the_rfc_example():
    assert H.accept_key(W.RFC_KEY) == W.RFC_ACCEPT  # RFC 6455 §1.3
    key = W.new_key()
    assert H.accept_key(key) == W.accept_for(key)


def test_accept_response_echoes_the_subprotocol():
    req = H.parse_upgrade(W.upgrade_request(protocols="mqttv3.1, mqtt"))
    status, headers, rest = W.response_head(H.accept_response(req))
    assert (status, rest) == (101, b"")
    assert headers["upgrade"].lower() == "websocket"
    assert headers["connection"].lower() == "upgrade"
    assert headers["sec-websocket-accept"] == W.RFC_ACCEPT
    assert headers["sec-websocket-protocol"] == "mqttv3.1"
    bare = H.accept_response(H.parse_upgrade(W.upgrade_request(protocols=None)))
    assert "sec-websocket-protocol" not in W.response_head(bare)[1]


BAD = {
    "post": (W.upgrade_request(method="POST"), 405, "ws_method"),
    "head-early": (b"HEAD / HTTP/1.1\r\n", 405, "ws_method"),
    "http-1.0": (W.upgrade_request(http="HTTP/1.0"), 400, "ws_bad_request"),
    "bad-version-token": (W.upgrade_request(http="HTTX/1.1"), 400, "ws_bad_request"),
    "two-spaces": (b"GET  /mqtt HTTP/1.1\r\n\r\n", 400, "ws_bad_request"),
    "no-host": (W.upgrade_request(drop=("host",)), 400, "ws_bad_request"),
    "plain-get": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 426, "ws_upgrade_required"),
    "other-upgrade": (W.upgrade_request(drop=("upgrade",), extra=[("Upgrade", "h2c")]), 426,
                      "ws_upgrade_required"),
    "no-connection-upgrade": (W.upgrade_request(drop=("connection",)), 400, "ws_bad_request"),
    "version-8": (W.upgrade_request(version="8"), 426, "ws_version"),
    "no-version": (W.upgrade_request(drop=("sec-websocket-version",)), 426, "ws_version"),
    "no-key": (W.upgrade_request(drop=("sec-websocket-key",)), 400, "ws_bad_request"),
    "short-key": (W.upgrade_request(key="c2hvcnQ="), 400, "ws_bad_request"),
    "not-base64-key": (W.upgrade_request(key="!!!!!!!!!!!!!!!!!!!!!!=="), 400, "ws_bad_request"),
    "two-keys": (W.upgrade_request(extra=[("Sec-WebSocket-Key", W.new_key())]), 400,
                 "ws_bad_request"),
    "body": (W.upgrade_request(extra=[("Content-Length", "5")]), 400, "ws_bad_request"),
    "chunked": (W.upgrade_request(extra=[("Transfer-Encoding", "chunked")]), 400,
                "ws_bad_request"),
    "wrong-subprotocol": (W.upgrade_request(protocols="chat, MQTT"), 400, "ws_subprotocol"),
    "folded": (W.upgrade_request().replace(b"Upgrade: websocket\r\n",
                                           b"Upgrade:\r\n websocket\r\n"), 400, "ws_bad_request"),
    "space-before-colon": (W.upgrade_request(extra=[("X-A ", "1")]), 400, "ws_bad_request"),
    "no-colon": (W.upgrade_request().replace(b"\r\n\r\n", b"\r\nnonsense\r\n\r\n"), 400,
                 "ws_bad_request"),
    "ctl-in-value": (W.upgrade_request(extra=[("X-A", "a\x01b")]), 400, "ws_bad_request"),
    "bad-target": (W.upgrade_request(path="mqtt"), 400, "ws_bad_request"),
    "not-http": (b"GEX\x00\x01", 400, "ws_bad_request"),
    "too-large": (W.upgrade_request(extra=[("Cookie", "c" * 20000)]), 431, "ws_too_large"),
    "too-large-unfinished": (b"GET /mqtt HTTP/1.1\r\nCookie: " + b"c" * 20000, 431,
                             "ws_too_large"),
    "too-many-headers": (W.upgrade_request(extra=[("X-%d" % i, "1") for i in range(120)]), 431,
                         "ws_too_large"),
}


@pytest.mark.parametrize("name", BAD)
def test_refusals_carry_the_right_status(name):
    data, status, reason = BAD[name]
    with pytest.raises(HandshakeError) as err:
        H.parse_upgrade(data)
    assert (err.value.status, err.value.reason) == (status, reason), str(err.value)
    body = H.error_response(err.value)
    got_status, headers, rest = W.response_head(body)
    assert got_status == status
    assert headers["connection"] in ("close", "Upgrade, close")
    assert int(headers["content-length"]) == len(rest)


def test_426_names_what_to_speak():
    with pytest.raises(HandshakeError) as err:
        H.parse_upgrade(W.upgrade_request(version="8"))
    assert W.response_head(H.error_response(err.value))[1]["sec-websocket-version"] == "13"
    with pytest.raises(HandshakeError) as err:
        H.parse_upgrade(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert W.response_head(H.error_response(err.value))[1]["upgrade"] == "websocket"


def test_bad_request_line_is_refused_before_the_head_ends():
    with pytest.raises(HandshakeError):
        H.parse_upgrade(b"GET /mqtt HTTP/1.0\r\nHost: x\r\n")


def test_client_text_is_escaped_in_messages():
    with pytest.raises(HandshakeError) as err:
        H.parse_upgrade(W.upgrade_request(protocols="evil\x1b[31m"))
    assert "\x1b" not in str(err.value)


@pytest.mark.parametrize("path,origins,origin,status", [
    (None, None, "http://evil.example", None),
    ("/mqtt", None, None, None),
    ("/other", None, None, 404),
    (None, ("http://app.example",), "http://app.example", None),
    (None, ("http://app.example",), "HTTP://APP.example", None),
    (None, ("http://app.example",), "http://evil.example", 403),
    (None, ("http://app.example",), None, None),  # non-browser clients send no Origin
])
def test_check_route(path, origins, origin, status):
    req = H.parse_upgrade(W.upgrade_request(path="/mqtt?q", origin=origin))
    if status is None:
        H.check_route(req, path, origins)
    else:
        with pytest.raises(HandshakeError) as err:
            H.check_route(req, path, origins)
        assert err.value.status == status


def _response(accept, status="101 Switching Protocols"):
    return ("HTTP/1.1 %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Accept: %s\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n"
            % (status, accept)).encode()


def test_parse_accept():
    good = _response(W.RFC_ACCEPT)
    for n in range(len(good)):
        assert H.parse_accept(good[:n], W.RFC_KEY) is None
    assert H.parse_accept(good + b"\x82\x02\x20\x02", W.RFC_KEY) == len(good)
    for bad in (_response("x" * 28), _response(W.RFC_ACCEPT, "400 Bad Request"),
                b"HTTP/1.1 101 OK\r\n\r\n", b"garbage\r\n\r\n"):
        with pytest.raises(HandshakeError) as err:
            H.parse_accept(bad, W.RFC_KEY)
        assert err.value.status == 502


@FUZZ
@given(st.binary(max_size=300), st.lists(st.integers(1, 50), max_size=12))
def test_any_bytes_give_need_more_a_request_or_a_refusal(tail, cuts):
    data = b"GET " + tail
    verdict = None
    pos = 0
    for cut in cuts + [len(data)]:
        pos = min(len(data), pos + cut)
        try:
            got = H.parse_upgrade(data[:pos], max_size=200)
        except HandshakeError as exc:
            got = ("refused", exc.status)
        assert got is None or isinstance(got, (H.UpgradeRequest, tuple))
        if verdict is not None:
            assert got == verdict, "a verdict changed as more bytes came"
        if got is not None:
            verdict = got


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(["Host", "Upgrade", "Connection", "Origin",
                                           "Sec-WebSocket-Protocol", "X-Junk"]),
                          st.text(st.characters(min_codepoint=32, max_codepoint=126),
                                  max_size=30)), max_size=8))
def test_any_headers_give_a_request_or_a_refusal(extra):
    data = W.upgrade_request(extra=extra)
    try:
        got = H.parse_upgrade(data)
    except HandshakeError as exc:
        assert exc.status in H.REASONS
        return
    assert got.length == len(data)
