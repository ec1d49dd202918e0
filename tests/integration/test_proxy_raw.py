"""Raw-socket behaviour of gproxy: rejected CONNECTs, unmatched connections,
byte-exact replay of what was peeked, and half-close in both directions.

Rejections go to a route whose upstream is a recording sink, so "nothing was
proxied" is checked at the upstream itself: the sink must see no connection.
A positive control (a valid CONNECT through the same route reaches the sink)
shows the check would notice.  Expected log lines are APISIX's wording
(docs/apisix-behaviour.md §1-2).
"""

import os
import re
import socket
import struct
import time

import pytest

from tests import packets
from tests.integration.conftest import (HOST, RecordingSink, mqtt_route, node, tcp_route,
                                       wait_until)
from tests.integration.helpers import (ApisixRing, Paho, dial, expect_closed, local_port,
                                       recv_exact)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

#: a source address for clients that must match the broker route, not the sink route
GOOD_SOURCE = "127.0.0.7"
PREREAD_TIMEOUT = 2
BUFFER_SIZE = 16384


@pytest.fixture(scope="module")
def setup(module_mosquitto, module_gproxy, module_sink):
    """One gproxy, one listener: clients from 127.0.0.7 go to a broker, others to the sink."""
    broker = module_mosquitto("good")
    gp = module_gproxy(
        [mqtt_route([node(broker)], route_id="to-broker", remote_addr=GOOD_SOURCE + "/32"),
         mqtt_route([node(module_sink)], route_id="to-sink")],
        config={"gproxy": {"preread": {"timeout": PREREAD_TIMEOUT,
                                       "buffer_size": BUFFER_SIZE}}})
    return gp, module_sink, broker


def reject_case(setup, payload, expected, close_how=None):
    """Send ``payload``, expect a close, the log line ``expected``, and a silent sink."""
    gp, sink, _ = setup
    before = sink.count()
    mark = gp.mark()
    sock = dial(gp.port)
    try:
        port = local_port(sock)
        if payload:
            sock.sendall(payload)
        if close_how == "shutdown":
            sock.shutdown(socket.SHUT_WR)
        started = time.monotonic()
        how = expect_closed(sock)
        elapsed = time.monotonic() - started
    finally:
        sock.close()
    line = gp.wait_for_session_line(port, expected, since=mark)
    # The rejection line is the session's last act, so no dial can follow it; the
    # sink's own probe, queued behind any connection gproxy made, shows none came.
    assert sink.settle() == before, "a rejected client reached the upstream: %r" % line
    assert not [ln for ln in gp.session_lines(port, mark) if "proxy request to" in ln]
    return line, elapsed, how


# -- positive control first: the sink does record a good client -------------------

def test_valid_connect_reaches_the_sink_byte_for_byte(setup):
    gp, sink, _ = setup
    before = sink.count()
    connect = packets.connect_v311("control")
    sock = dial(gp.port)
    try:
        sock.sendall(connect)
        conn = sink.wait_for_connection(before)
        packets.assert_packet(conn.wait_for_bytes(len(connect)), connect, "replayed CONNECT")
    finally:
        sock.close()


# -- rejections -------------------------------------------------------------------

def test_garbage_first_byte_is_rejected(setup):
    line, elapsed, _ = reject_case(
        setup, b"mmm", "failed to parse the msg header: "
                       "Received unexpected MQTT packet type+flags: 109")
    assert "[error]" in line
    assert elapsed < 1.0, "rejected only after %.1fs (byte 0 is checked at once)" % elapsed


def test_level5_connect_on_level4_route_is_rejected(setup):
    line, _, _ = reject_case(setup, packets.C5_PROPS, "expect protocol level: 4, but got 5")
    assert "[error]" in line


def test_rejection_also_logs_the_plugin_exit_status(setup):
    gp, _, _ = setup
    mark = gp.mark()
    _, _, _ = reject_case(setup, packets.C5_EMPTY, "expect protocol level: 4, but got 5")
    line = gp.wait_for_log("mqtt-proxy exits with status code 503", timeout=1, since=mark)
    assert "[warn]" in line


def test_wrong_protocol_name_is_rejected(setup):
    reject_case(setup, packets.connect_v311("named", protocol_name=b"MQTX"),
                "expect protocol name: MQTT, but got MQTX")


def test_mqisdp_connect_on_mqtt_route_is_rejected(setup):
    # name is checked before level (§1 step 7)
    reject_case(setup, packets.connect_v31("old"), "expect protocol name: MQTT, but got MQIsdp")


def test_client_id_length_past_the_packet_is_rejected(setup):
    # id length says 10, only 3 bytes follow: p = 2+6+1+3+2 = 14, expect 24, packet 17
    body = packets.encode_string("MQTT") + struct.pack("!BBH", 4, 2, 60) \
        + struct.pack("!H", 10) + b"abc"
    bad = packets.packet(packets.CONNECT, body)
    assert len(bad) == 17
    reject_case(setup, bad, "failed to parse mqtt request, expect len: 24 but got 17")


def test_oversized_connect_is_closed_early(setup):
    # remaining length 16384: the whole packet (3 + 16384 bytes) cannot fit the buffer
    head = packets.fixed_header(packets.CONNECT, BUFFER_SIZE) + packets.encode_string("MQTT")
    line, elapsed, _ = reject_case(setup, head, "preread buffer full")
    assert elapsed < PREREAD_TIMEOUT / 2, "closed after %.1fs, not early" % elapsed


def test_connect_of_exactly_buffer_size_is_accepted(setup):
    """The boundary: a CONNECT of exactly preread buffer_size bytes still fits."""
    gp, sink, _ = setup
    before = sink.count()
    small = packets.connect_v311("edge", password=b"")
    # trailing payload inside the remaining length is ignored by the parser (§1 step 6)
    pad = BUFFER_SIZE - len(small) - 1  # one more length byte: 3-byte remaining length
    big = packets.connect_v311("edge", password=b"p" * pad)
    assert len(big) == BUFFER_SIZE, len(big)
    sock = dial(gp.port)
    try:
        sock.sendall(big)
        conn = sink.wait_for_connection(before)
        packets.assert_packet(conn.wait_for_bytes(len(big)), big, "16 KiB CONNECT")
    finally:
        sock.close()


def test_stalled_connect_is_closed_after_preread_timeout(setup):
    connect = packets.connect_v311("slow")
    line, elapsed, _ = reject_case(
        setup, connect[:3],
        re.compile(r"failed to read (the msg header|the Connect Command): timeout"))
    assert PREREAD_TIMEOUT - 0.5 <= elapsed <= PREREAD_TIMEOUT + 2.5, elapsed


def test_preread_timeout_covers_the_whole_connect_not_each_read(setup):
    """A client trickling a byte every 0.4 s still has only preread.timeout in total."""
    gp, sink, _ = setup
    before = sink.count()
    mark = gp.mark()
    connect = packets.connect_v311("slowloris")
    sock = dial(gp.port)
    try:
        port = local_port(sock)
        started = time.monotonic()
        for i in range(len(connect) - 1):  # bounded: 0.4 s x 24 bytes at most
            try:
                sock.sendall(connect[i:i + 1])
            except (BrokenPipeError, ConnectionResetError):
                break
            if [ln for ln in gp.session_lines(port, mark) if "[error]" in ln]:
                break  # gproxy has given up on us
            time.sleep(0.4)
        try:
            sock.settimeout(3)
            while sock.recv(64):  # gproxy never sends; just wait for the close
                pass
        except ConnectionResetError:
            pass
        elapsed = time.monotonic() - started
    finally:
        sock.close()
    gp.wait_for_session_line(port, "failed to read the Connect Command: timeout", since=mark)
    assert elapsed <= PREREAD_TIMEOUT + 1.5, elapsed
    assert sink.settle() == before


def test_half_connect_then_eof_is_rejected(setup):
    connect = packets.connect_v311("half")
    line, elapsed, how = reject_case(
        setup, connect[:8],
        re.compile(r"failed to read (the msg header|the Connect Command): closed"),
        close_how="shutdown")
    assert elapsed < 1.0


def test_eof_before_any_byte_is_rejected(setup):
    reject_case(setup, b"", re.compile(r"failed to read the msg header: closed"),
                close_how="shutdown")


# -- replay: every byte after the CONNECT, unchanged and in order ---------------------

def test_connect_and_publish_in_one_segment_are_replayed_exactly(setup):
    gp, sink, _ = setup
    before = sink.count()
    wire = packets.connect_v311("replay") + packets.publish("a/b", b"payload", qos=1) \
        + packets.pingreq()
    sock = dial(gp.port)
    try:
        sock.sendall(wire)
        conn = sink.wait_for_connection(before)
        packets.assert_packet(conn.wait_for_bytes(len(wire)), wire, "replayed stream")
    finally:
        sock.close()


def test_large_burst_after_connect_is_relayed_exactly(setup):
    gp, sink, _ = setup
    before = sink.count()
    wire = packets.connect_v311("burst") + os.urandom(200_000)
    sock = dial(gp.port)
    try:
        sock.sendall(wire)
        sock.shutdown(socket.SHUT_WR)
        conn = sink.wait_for_connection(before)
        assert conn.eof.wait(5), "the sink never saw the client's EOF"
        got = conn.data
        assert len(got) == len(wire) and got == wire, "relayed %d of %d bytes, first " \
            "difference at %s" % (len(got), len(wire), next(
                (i for i, (x, y) in enumerate(zip(got, wire)) if x != y), min(len(got), len(wire))))
        assert expect_closed(sock) == "eof"  # the sink closed after EOF: passed back
    finally:
        sock.close()


def test_connect_trickled_byte_by_byte_is_reassembled(setup):
    gp, sink, _ = setup
    before = sink.count()
    wire = packets.connect_v311("trickle") + packets.publish("t/r", b"after")
    sock = dial(gp.port)
    try:
        for i in range(len(wire)):
            sock.sendall(wire[i:i + 1])
            time.sleep(0.02)
        conn = sink.wait_for_connection(before)
        packets.assert_packet(conn.wait_for_bytes(len(wire)), wire, "trickled stream")
    finally:
        sock.close()


# -- the listener survives all of the above ---------------------------------------------

def test_good_paho_client_still_works_after_rejections(setup):
    gp, _, broker = setup
    with Paho("after-all", gp.port, source=GOOD_SOURCE) as client:
        client.subscribe("gp/after", 1)
        client.publish("gp/after", b"still serving", 1)
        assert client.expect_message().payload == b"still serving"
        gp.wait_for_session_line((GOOD_SOURCE, client.local_port), "mqtt client id: after-all while prereading client data,")
    broker.wait_for_client("after-all")
    assert gp.proc.poll() is None


# -- no matching route ----------------------------------------------------------------

@pytest.mark.parametrize("filters", ["server_port", "remote_addr"])
def test_no_matching_route_closes_without_reaching_upstream(gproxy, sink, filters):
    other_port = sink.port  # any port but the listener's
    extra = {"server_port": other_port} if filters == "server_port" else \
        {"remote_addr": "10.0.0.0/8"}
    gp = gproxy([mqtt_route([node(sink)], **extra)])
    mark = gp.mark()
    for payload in (b"", packets.connect_v311("nomatch")):
        sock = dial(gp.port)
        try:
            port = local_port(sock)
            if payload:
                sock.sendall(payload)
            expect_closed(sock)
        finally:
            sock.close()
        line = gp.wait_for_session_line(port, "not hit any route", since=mark)
        assert "match(): not hit any route" in line
    assert sink.settle() == 0
    assert "proxy request to" not in gp.log(mark)


# -- half-close on a plain TCP route ------------------------------------------------------

def test_client_half_close_reaches_upstream_and_answer_comes_back(gproxy, holding_sink):
    gp = gproxy([tcp_route([node(holding_sink)])])
    sock = dial(gp.port)
    try:
        sock.sendall(b"request")
        sock.shutdown(socket.SHUT_WR)
        conn = holding_sink.wait_for_connection(0)
        assert conn.eof.wait(5), "the upstream never saw the client's half-close"
        assert conn.data == b"request"
        conn.send(b"answer after half-close")
        assert recv_exact(sock, 23) == b"answer after half-close"
        conn.close()
        assert expect_closed(sock) == "eof"
    finally:
        sock.close()
    assert holding_sink.count() == 1


def test_upstream_half_close_reaches_client_and_client_can_still_send(gproxy, holding_sink):
    gp = gproxy([tcp_route([node(holding_sink)])])
    sock = dial(gp.port)
    try:
        sock.sendall(b"hello")
        conn = holding_sink.wait_for_connection(0)
        assert conn.wait_for_bytes(5) == b"hello"
        conn.send(b"bye")
        conn.shutdown_write()
        assert recv_exact(sock, 3) == b"bye"
        assert sock.recv(16) == b"", "the client did not see the upstream's EOF"
        sock.sendall(b"late words")
        assert conn.wait_for_bytes(15) == b"hellolate words"
        assert not conn.eof.is_set()
        sock.shutdown(socket.SHUT_WR)
        assert conn.eof.wait(5)
        assert conn.data == b"hellolate words"
    finally:
        sock.close()
    assert wait_until(lambda: gp.find("session closed"), 5)


# -- chash keys are raw bytes; the fallback key is the client's own IP -------------------

def test_chash_hashes_raw_client_id_bytes_and_client_ip(gproxy):
    sinks = [RecordingSink(), RecordingSink()]
    try:
        gp = gproxy([mqtt_route([node(s) for s in sinks])])
        ring = ApisixRing([(s.host, s.port, 1) for s in sinks])
        cases = [(b"\xff\xfe\x00raw", None), (b"a:b:c", None), (b"x" * 1000, None),
                 ("\u00fcn\u00efcode".encode(), None), (b"", None), (b"", GOOD_SOURCE)]
        for client_id, source in cases:
            key = client_id or (source or HOST).encode()
            counts = [s.count() for s in sinks]
            wire = packets.connect_v311(client_id)
            sock = dial(gp.port, source)
            try:
                sock.sendall(wire)
                got = wait_until(lambda: [i for i, s in enumerate(sinks)
                                          if s.count() > counts[i]], 5)
                assert got and len(got) == 1, (client_id, got)
                conn = sinks[got[0]].connections[counts[got[0]]]
                packets.assert_packet(conn.wait_for_bytes(len(wire)), wire, "CONNECT")
                assert sinks[got[0]].addr == ring.pick(key), (
                    "id %r from %s went to %s, the APISIX ring says %s"
                    % (client_id, source or HOST, sinks[got[0]].addr, ring.pick(key)))
            finally:
                sock.close()
    finally:
        for s in sinks:
            s.close()


# -- server_port picks the route per listener ---------------------------------------------

def test_server_port_selects_the_route_of_each_listener(gproxy):
    sinks = [RecordingSink(), RecordingSink()]
    try:
        gp = gproxy(lambda ports: [tcp_route([node(sinks[1])], route_id="second",
                                             server_port=ports[1]),
                                   tcp_route([node(sinks[0])], route_id="first",
                                             server_port=ports[0])], listeners=2)
        for i, port in enumerate(gp.ports):
            sock = dial(port)
            try:
                greeting = b"to listener %d" % i
                sock.sendall(greeting)
                conn = sinks[i].wait_for_connection(0)
                assert conn.wait_for_bytes(len(greeting)) == greeting
            finally:
                sock.close()
        assert [s.count() for s in sinks] == [1, 1]
    finally:
        for s in sinks:
            s.close()


# -- every node down -------------------------------------------------------------------------

def test_all_nodes_down_closes_the_client(gproxy):
    dead = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(2)]
    try:
        for s in dead:
            s.bind((HOST, 0))  # bound, never listening: connect() is refused
        addrs = ["%s:%d" % s.getsockname() for s in dead]
        gp = gproxy([mqtt_route([node(s.getsockname()[1]) for s in dead],
                                type_="roundrobin")])
        sock = dial(gp.port)
        try:
            port = local_port(sock)
            sock.sendall(packets.connect_v311("nowhere"))
            expect_closed(sock)
        finally:
            sock.close()
        gp.wait_for_session_line(port, "all upstream servers tried")
        failed = [ln for ln in gp.session_lines(port) if "connect() failed" in ln]
        assert sorted(a for a in addrs for ln in failed if a in ln) == sorted(addrs)
    finally:
        for s in dead:
            s.close()


# -- upstream_id --------------------------------------------------------------------------

def test_upstream_id_wins_over_inline_upstream(gproxy):
    sinks = [RecordingSink(), RecordingSink()]
    try:
        route = tcp_route([node(sinks[1])], upstream_id="shared")
        gp = gproxy([route], upstreams=[{"id": "shared", "type": "roundrobin",
                                         "nodes": [node(sinks[0])]}])
        sock = dial(gp.port)
        try:
            sock.sendall(b"by id")
            conn = sinks[0].wait_for_connection(0)
            assert conn.wait_for_bytes(5) == b"by id"
        finally:
            sock.close()
        assert sinks[1].settle() == 0
    finally:
        for s in sinks:
            s.close()


# -- the first matching route in file order wins (§4.2) --------------------------------------

def test_first_matching_route_in_file_order_wins(gproxy):
    sinks = [RecordingSink(), RecordingSink()]

    def routes(first, second):
        return [tcp_route([node(sinks[first])], route_id="r%d" % first,
                          remote_addr="127.0.0.0/8"),
                tcp_route([node(sinks[second])], route_id="r%d" % second)]

    def send_one():
        sock = dial(gp.port)
        try:
            sock.sendall(b"ping")
            got = wait_until(lambda: [i for i, s in enumerate(sinks) if s.count() > seen[i]], 5)
        finally:
            sock.close()
        assert got and len(got) == 1, got
        seen[got[0]] += 1
        return got[0]

    try:
        gp = gproxy(routes(0, 1))
        seen = [0, 0]
        assert send_one() == 0
        gp.rewrite_routes(routes(1, 0))  # same routes, the other one first
        assert wait_until(send_one, 6, interval=0.2) == 1  # send_one returns 0 until applied
    finally:
        for s in sinks:
            s.close()
