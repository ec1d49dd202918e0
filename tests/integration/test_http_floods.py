"""The HTTP listeners (Admin API, control API, metrics) under idle and slow floods.

Thousands of connections that send nothing, send a request a byte at a time
(slowloris) or a body that never ends must not keep a fresh request waiting:
at ``gproxy.admin.max_connections`` a new connection takes the place of an
idle or slow one of the client holding the most, and a request has
``gproxy.admin.request_timeout`` to arrive whole however it trickles.
gproxy says so in one summary line a second, never a traceback (the
``gproxy`` fixture fails a test whose gproxy logged one).  Real sockets on
loopback, gproxy as a child process.
"""

import http.client
import re
import socket
import threading
import time

import pytest

from tests.integration.conftest import HOST, mqtt_route, node, wait_until
from tests.integration.helpers import http_call, raw_session

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

KEY = "edd1c9f034335f136f87ad84b625c8f1"
PROMPT = 2.0  # seconds: "answered promptly" on a busy 2-core machine (idle: ~10 ms)
SUMMARY = re.compile(r"^(\S+ \S+) \[(?:info|warn)\] \d+#0: http: closed (\d+) connections?")


def flood(port, n, source=None, send=b""):
    """``n`` connections to ``port`` that send ``send`` (maybe nothing) and stay open."""
    socks = []
    for _ in range(n):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(5)
        if source:
            sock.bind((source, 0))
        sock.connect((HOST, port))
        if send:
            sock.sendall(send)
        socks.append(sock)
    return socks


def close_all(socks):
    for sock in socks:
        sock.close()


def timed_get(port, path, headers=None):
    started = time.monotonic()
    status, body = http_call(port, "GET", path, headers=headers, timeout=10)
    return status, body, time.monotonic() - started


def summaries(gp, since=0):
    """``(timestamp, closed)`` of each summary line; at most one a second."""
    found = [SUMMARY.match(ln) for ln in gp.log(since).splitlines()]
    lines = [(m.group(1), int(m.group(2))) for m in found if m]
    stamps = [stamp for stamp, _ in lines]
    assert len(stamps) == len(set(stamps)), "two summary lines in one second:\n" + gp.log(since)
    return lines


def closed_by_peer(sock, timeout):
    """True once the peer has closed ``sock`` (EOF or reset) within ``timeout``."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


LISTENERS = {
    "admin": (lambda gp: gp.admin_port, "/apisix/admin/stream_routes", {"X-API-KEY": KEY}),
    "control": (lambda gp: gp.control_port, "/v1/healthcheck", {}),
    "metrics": (lambda gp: gp.metrics_port, "/apisix/prometheus/metrics", {}),
}


@pytest.mark.parametrize("listener", sorted(LISTENERS))
def test_an_idle_flood_leaves_a_fresh_request_answered_promptly(gproxy, mosquitto, listener):
    """1,500 idle connections (30 s idle timeout, cap 16), then more opened
    nonstop while requests come: each request is answered at once, where
    the old listener left it in the backlog until an idle one timed out."""
    broker = mosquitto()
    gp = gproxy([mqtt_route([node(broker)])],
                config={"gproxy": {"admin": {"max_connections": 16, "timeout": 30}}})
    port_of, path, headers = LISTENERS[listener]
    port = port_of(gp)
    idle = flood(port, 1500)
    stop = threading.Event()
    more = []

    def keep_flooding():
        while not stop.is_set() and len(more) < 1500:
            more.extend(flood(port, 20))

    flooder = threading.Thread(target=keep_flooding, daemon=True)
    flooder.start()
    try:
        took = []
        for _ in range(5):
            status, _, seconds = timed_get(port, path, headers)
            assert status == 200
            took.append(seconds)
        assert max(took) < PROMPT, took
    finally:
        stop.set()
        flooder.join(10)
        close_all(idle + more)
    raw_session(gp.port, "data-path-unaffected")
    assert wait_until(lambda: sum(n for _, n in summaries(gp)) >= 1500, 10), gp.log()[-3000:]
    assert "%s reclaimed=" % listener in gp.log()
    reclaimed = gp.metrics()[("gproxy_http_connections_closed_total",
                              frozenset({"listener": listener, "reason": "reclaimed"}.items()))]
    assert reclaimed >= 1500 - 16


def test_slowloris_connections_are_cut_at_the_request_timeout(gproxy):
    """Connections that keep sending a header byte every 0.2 s are closed
    ``request_timeout`` (1 s) after their first byte, not kept alive by each
    byte; meanwhile a fresh request is answered at once."""
    gp = gproxy([], config={"gproxy": {"admin": {"max_connections": 32, "request_timeout": 1}}})
    slow = flood(gp.admin_port, 300, send=b"GET /apisix/admin/routes HTTP/1.1\r\nX-a: ")
    started = time.monotonic()
    stop = threading.Event()

    def dribble():
        while not stop.is_set():
            for sock in slow:
                try:
                    sock.send(b"a")
                except OSError:
                    pass
            stop.wait(0.2)

    dribbler = threading.Thread(target=dribble, daemon=True)
    dribbler.start()
    try:
        status, _, seconds = timed_get(gp.admin_port, "/apisix/admin/stream_routes",
                                       {"X-API-KEY": KEY})
        assert status == 200 and seconds < PROMPT, seconds
        survivors = [s for s in slow[-32:] if not closed_by_peer(s, 4.0)]
        assert not survivors, "%d slowloris connections outlived the request timeout" % len(
            survivors)
        assert time.monotonic() - started < 6.0
    finally:
        stop.set()
        dribbler.join(5)
        close_all(slow)
    gp.wait_for_log("request_timeout=")
    assert "reclaimed=" in gp.log()
    summaries(gp)


def test_a_body_that_never_ends_never_reaches_the_store(gproxy):
    """A PUT that stops halfway through its body is closed at the request
    timeout; its half-sent route is not stored."""
    gp = gproxy([], config={"gproxy": {"admin": {"request_timeout": 1}}})
    body = b'{"upstream": {"type": "roundrobin", "nodes": {"127.0.0.1:1": 1}}}'
    head = ("PUT /apisix/admin/stream_routes/9 HTTP/1.1\r\nHost: x\r\nX-API-KEY: %s\r\n"
            "Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (KEY, len(body)))
    (sock,) = flood(gp.admin_port, 1, send=head.encode() + body[:20])
    try:
        started = time.monotonic()
        assert closed_by_peer(sock, 5.0), "the stalled body was not cut"
        assert time.monotonic() - started < 4.0
    finally:
        sock.close()
    code, _ = gp.admin("GET", "/stream_routes/9")
    assert code == 404
    gp.wait_for_log("admin request_timeout=1")


def test_a_flood_from_another_address_does_not_displace_a_kept_alive_client(gproxy):
    """At the cap the busiest client gives way first: 500 idle connections from
    127.0.0.2 leave 127.0.0.1's kept-alive connection (the dashboard's) open."""
    gp = gproxy([], config={"gproxy": {"admin": {"max_connections": 8}}})
    mine = http.client.HTTPConnection(HOST, gp.admin_port, timeout=5)
    try:
        mine.request("GET", "/apisix/admin/stream_routes", headers={"X-API-KEY": KEY})
        assert mine.getresponse().read() and mine.sock is not None
        kept = mine.sock.getsockname()
        others = flood(gp.admin_port, 500, source="127.0.0.2")
        gp.wait_for_log("most from 127.0.0.2")
        mine.request("GET", "/apisix/admin/stream_routes", headers={"X-API-KEY": KEY})
        resp = mine.getresponse()
        assert resp.status == 200 and resp.read()
        assert mine.sock.getsockname() == kept, "the kept-alive connection was replaced"
        close_all(others)
    finally:
        mine.close()


def test_malformed_requests_are_counted_not_logged_one_by_one(gproxy):
    gp = gproxy([])
    for i in range(200):
        (sock,) = flood(gp.admin_port, 1, send=b"\x16\x03\x01 not http %d\r\n\r\n" % i)
        try:
            sock.settimeout(5)
            assert sock.recv(100).startswith(b"HTTP/1.1 400")
        finally:
            sock.close()
    assert wait_until(lambda: sum(n for _, n in summaries(gp)) >= 200, 5), gp.log()
    assert "bad_request=" in gp.log()
    assert "Invalid request" not in gp.log()
    assert http_call(gp.admin_port, "GET", "/apisix/admin/stream_routes",
                     headers={"X-API-KEY": KEY})[0] == 200


def test_idle_connections_close_at_the_idle_timeout(gproxy):
    """Below the cap, an idle connection (new, or kept alive after a response)
    is closed after ``gproxy.admin.timeout``, as one routine summary line."""
    gp = gproxy([], config={"gproxy": {"admin": {"timeout": 1}}})
    new = flood(gp.admin_port, 2)
    kept = http.client.HTTPConnection(HOST, gp.admin_port, timeout=5)
    kept.request("GET", "/apisix/admin/stream_routes", headers={"X-API-KEY": KEY})
    assert kept.getresponse().read()
    started = time.monotonic()
    try:
        assert all(closed_by_peer(s, 5.0) for s in new + [kept.sock])
        assert 0.5 <= time.monotonic() - started < 4.0
    finally:
        close_all(new)
        kept.close()
    assert wait_until(lambda: sum(n for _, n in summaries(gp)) >= 3, 5), gp.log()
    assert "[info]" in gp.find("http: closed")[-1]
