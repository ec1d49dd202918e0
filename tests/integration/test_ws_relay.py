"""The relay with a WebSocket client endpoint, in this process, on socket pairs.

gproxy's relay moves MQTT bytes between a ``WebSocketEndpoint`` (frames on
the client's side) and a plain socket (the broker's side).  The client's
frames come from tests/wsframes.py and what reaches it is read back with the
same independent reader: unwrapping (fragments, pings), wrapping, Close codes
both ways, back-pressure with a client that does not read, and ``Relay.end_at_boundary``
(DISCONNECTs at packet boundaries, framed towards the client).
"""

import socket
import time

import gevent
import pytest

from gproxy.protocols.wsframe import FrameParser
from gproxy.proxy.relay.hub import RelayHub
from gproxy.proxy.relay.wsendpoint import WebSocketEndpoint
from gproxy.proxy.sessions.registry import SessionInfo
from tests import packets as P
from tests import wsframes as W

WAIT = 5.0


class Pair:
    """One relay: ``client`` speaks WebSocket, ``broker`` plain MQTT bytes."""

    def __init__(self, hub, mqtt=True, client_close=None):
        self.client, client_end = socket.socketpair()
        upstream_end, self.broker = socket.socketpair()
        for s in (self.client, self.broker, client_end, upstream_end):
            s.setblocking(False)  # the relay takes endpoints non-blocking
        self.info = SessionInfo("1", "127.0.0.1", 1, "127.0.0.1", 2)
        self.done = []
        self.endpoint = WebSocketEndpoint(client_end, FrameParser(masked=True),
                                          client_close=client_close)
        self.relay = hub.start(self.endpoint, upstream_end, self.info, self.done.append, 60.0,
                               mqtt=mqtt)
        self.from_client = b""  # raw bytes the client received, not parsed yet

    def read(self, sock, until, timeout=WAIT):
        """Bytes from ``sock`` until ``until(bytes)`` is true (running the hub meanwhile)."""
        got = b""
        deadline = time.monotonic() + timeout
        while not until(got):
            assert time.monotonic() < deadline, "timed out; got %r" % got[:200]
            try:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    return got
                got += chunk
            except BlockingIOError:
                gevent.sleep(0.002)
        return got

    def frames(self, count=1, timeout=WAIT):
        """The next ``count`` frames the client got, as (fin, opcode, payload)."""
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < count:
            parsed = W.read_frame(self.from_client)
            if parsed is not None:
                fin, opcode, payload, self.from_client = parsed
                out.append((fin, opcode, payload))
                continue
            assert time.monotonic() < deadline, "no frame; have %r" % self.from_client[:64]
            try:
                chunk = self.client.recv(1 << 20)
                assert chunk, "the client's socket closed after %d frames" % len(out)
                self.from_client += chunk
            except BlockingIOError:
                gevent.sleep(0.002)
        return out

    def client_eof(self, timeout=WAIT):
        return self.read(self.client, lambda got: False, timeout) == b""

    def wait_done(self, timeout=WAIT):
        deadline = time.monotonic() + timeout
        while not self.done:
            assert time.monotonic() < deadline, "the relay did not finish"
            gevent.sleep(0.005)
        return self.relay.reason

    def close(self):
        self.client.close()
        self.broker.close()


@pytest.fixture
def pair():
    hub = RelayHub()
    made = []

    def make(**kw):
        p = Pair(hub, **kw)
        made.append(p)
        gevent.sleep(0.005)
        return p

    yield make
    hub.close_all()
    hub.queue.close()
    for p in made:
        p.close()


def test_frames_are_unwrapped_and_pings_answered(pair):
    p = pair()
    publish = P.publish("t", b"x" * 300)
    p.client.send(W.frame(W.PING, b"are you there") + W.fragments(publish, [1, 2, 100])
                  + W.binary(P.pingreq()))
    want = publish + P.pingreq()
    assert p.read(p.broker, lambda got: len(got) >= len(want)) == want
    assert p.frames() == [(True, W.PONG, b"are you there")]
    assert p.info.bytes_in == len(want)  # MQTT bytes, not wire bytes


def test_broker_bytes_are_wrapped_in_binary_frames(pair):
    p = pair()
    p.broker.send(b"\x20\x02\x00\x00")
    assert p.frames() == [(True, W.BINARY, b"\x20\x02\x00\x00")]
    assert p.info.bytes_out == 4


def test_a_client_that_does_not_read_holds_the_broker_back(pair):
    p = pair()
    big = bytes(range(256)) * 8192  # 2 MiB
    sent, deadline = 0, time.monotonic() + WAIT
    while sent < len(big) and time.monotonic() < deadline:
        try:
            sent += p.broker.send(big[sent:sent + 65536])
        except BlockingIOError:
            gevent.sleep(0.005)
            if p.endpoint._out and p.relay.down.backlog is not None:
                break  # gproxy stopped reading: back-pressure reached the broker
    assert sent < len(big), "2 MiB went through with a client that reads nothing"
    assert len(p.endpoint._out) <= 65536 + 10  # at most one frame buffered in the endpoint
    got = b""
    while len(got) < len(big):
        if sent < len(big):
            try:
                sent += p.broker.send(big[sent:sent + 65536])
            except BlockingIOError:
                pass
        for fin, opcode, payload in p.frames():
            assert (fin, opcode) == (True, W.BINARY)
            got += payload
    assert got == big


def test_a_client_that_pings_and_never_reads_costs_one_pong(pair):
    """RFC 6455 §5.5.3: while a Pong waits for the socket, a newer Ping replaces
    it.  30,000 pings (3.8 MB of them) from a client that reads nothing: the
    endpoint's buffer stays at a frame or two, MQTT bytes still get through,
    and once the client reads it gets the latest Pong last."""
    p = pair()
    p.client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    pings = [W.frame(W.PING, b"%06d" % i + b"p" * 119) for i in range(30000)]
    wire = b"".join(pings) + W.binary(P.pingreq())
    sent, deadline = 0, time.monotonic() + 20
    while sent < len(wire):
        assert time.monotonic() < deadline, "gproxy stopped reading the pings"
        try:
            sent += p.client.send(wire[sent:sent + 65536])
        except BlockingIOError:
            gevent.sleep(0.001)
        buffered = len(p.endpoint._out) + len(getattr(p.endpoint, "_pong", b""))
        assert buffered <= 2 * 130, "%d bytes of pongs buffered" % buffered
    assert p.read(p.broker, lambda got: len(got) >= 2) == P.pingreq()
    pongs = []
    while not pongs or pongs[-1][2][:6] != b"029999":
        pongs += p.frames()
    assert all(opcode == W.PONG for _, opcode, _ in pongs)
    assert len(pongs) < len(pings), "every ping got its own pong: nothing was folded"


def test_client_close_is_echoed_and_ends_the_broker_side(pair):
    p = pair()
    p.client.send(W.binary(P.pingreq()) + W.close(1000, b"bye"))
    assert p.read(p.broker, lambda got: False) == P.pingreq()  # then EOF
    assert p.frames() == [(True, W.CLOSE, b"\x03\xe8")]
    p.broker.close()
    assert p.wait_done() == "eof"
    assert p.endpoint.client_close == 1000


def test_broker_eof_sends_close_1000(pair):
    p = pair()
    p.broker.send(b"\x20\x02\x00\x00")
    p.broker.shutdown(socket.SHUT_WR)
    assert p.frames(2) == [(True, W.BINARY, b"\x20\x02\x00\x00"),
                           (True, W.CLOSE, b"\x03\xe8")]
    p.client.send(W.close(1000))
    assert p.wait_done() == "eof"


@pytest.mark.parametrize("frame,code", [(W.frame(W.TEXT, b"{}"), 1003),
                                        (W.binary(b"x", mask=None), 1002),
                                        (W.frame(W.PING, b"p" * 126), 1002)])
def test_a_bad_frame_fails_the_connection_with_its_code(pair, frame, code):
    p = pair()
    p.client.send(W.binary(P.pingreq()) + frame)
    assert p.read(p.broker, lambda got: False) == P.pingreq()  # what came before, then close
    fin, opcode, payload = p.frames()[0]
    assert (opcode, W.close_code(payload)) == (W.CLOSE, code)
    assert "(close %d)" % code in p.wait_done()
    assert p.client_eof()


def test_abort_sends_close_1001(pair):
    p = pair()
    p.relay.abort("disconnected")
    fin, opcode, payload = p.frames()[0]
    assert (opcode, W.close_code(payload)) == (W.CLOSE, 1001)
    assert p.client_eof()


def test_relay_end_says_goodbye_at_packet_boundaries_in_frames(pair):
    p = pair()
    publish = P.publish("t", b"y" * 50)
    p.client.send(W.binary(publish[:10]))  # half a packet: the end waits for the rest
    assert p.read(p.broker, lambda got: len(got) >= 10) == publish[:10]
    client_bye = bytes.fromhex("e0 02 8b 00")
    assert p.relay.end_at_boundary(P.disconnect(), client_bye, grace=5.0)
    assert p.frames(2) == [(True, W.BINARY, client_bye), (True, W.CLOSE, b"\x03\xe8")]
    p.client.send(W.binary(publish[10:] + P.pingreq()))
    got = p.read(p.broker, lambda got: False)
    assert got == publish[10:] + P.disconnect()  # the PINGREQ after the boundary is dropped
    assert p.wait_done() == "eof"


def test_a_close_read_before_the_relay_ends_it_without_more_client_bytes(pair):
    p = pair(client_close=1001)  # preread saw the Close right behind the CONNECT
    assert p.frames() == [(True, W.CLOSE, b"\x03\xe9")]  # echoed at once
    assert p.read(p.broker, lambda got: False) == b""  # the broker gets its FIN
    p.broker.close()
    assert p.wait_done() == "eof"
