"""Relay.end_at_boundary: each direction stops between two MQTT packets and says goodbye.

Relays run in this process on socket pairs.  The test plays the client and
the broker, ends the relay in the middle of a packet, and checks byte for
byte what each side received: every whole packet up to the boundary, then
the DISCONNECT, then end of stream; nothing after the boundary.  ``Pair``
uses Unix socket pairs (the relay copies); ``TcpPair`` loopback TCP with
C-level sockets, as sessions hand the relay, so large packets are walked
and spliced (relay.WALK) or, on kernels without SO_PEEK_OFF, their bodies
spliced (relay.BODY).
"""

import _socket
import socket
import threading
import time

import gevent
import pytest

from gproxy.protocols.mqttstream import SERVER_SHUTTING_DOWN, disconnect
from gproxy.proxy.relay.direction import PEEK_WALK, WALK
from gproxy.proxy.relay.hub import RelayHub
from gproxy.proxy.sessions.registry import SessionInfo
from tests import packets as P

BROKER_BYE = P.disconnect(4)
CLIENT_BYE_V5 = P.disconnect(5, 0x8B)


class Pair:
    """A relay between a test-side client socket and a test-side broker socket."""

    def __init__(self, hub, mqtt=True):
        self.client, client_end = socket.socketpair()
        upstream_end, self.broker = socket.socketpair()
        for s in (client_end, upstream_end):
            s.setblocking(False)
        self.info = SessionInfo("t-1", "127.0.0.1", 1, "127.0.0.1", 2)
        self.done = []
        self.relay = hub.start(client_end, upstream_end, self.info, self.done.append, 60.0,
                               mqtt=mqtt)

    @staticmethod
    def read_all(sock, timeout=5.0):
        """Everything ``sock`` receives until the relay closes its side."""
        sock.setblocking(False)
        got = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(1 << 20)
            except BlockingIOError:
                gevent.sleep(0.005)
                continue
            if not chunk:
                return got
            got += chunk
        raise AssertionError("no end of stream within %.0fs (got %d bytes)" % (timeout, len(got)))

    def close(self):
        self.client.close()
        self.broker.close()


def tcp_pair():
    """Two connected loopback TCP sockets: (the test's end, a C-level non-blocking end)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        ours = socket.create_connection(listener.getsockname())
        theirs, _ = listener.accept()
    raw = _socket.socket(theirs.family, theirs.type, theirs.proto, theirs.detach())
    raw.setblocking(False)
    return ours, raw


class TcpPair(Pair):
    def __init__(self, hub, mqtt=True):
        self.client, client_end = tcp_pair()
        self.broker, upstream_end = tcp_pair()
        self.info = SessionInfo("t-1", "127.0.0.1", 1, "127.0.0.1", 2)
        self.done = []
        self.relay = hub.start(client_end, upstream_end, self.info, self.done.append, 60.0,
                               mqtt=mqtt)


def send_in_thread(sock, data):
    """``sock.sendall(data)`` in a real thread (the hub must keep running the relay)."""
    sock.setblocking(True)
    thread = threading.Thread(target=sock.sendall, args=(data,), daemon=True)
    thread.start()
    return thread


@pytest.fixture
def hub():
    relays = RelayHub()
    yield relays
    relays.close_all()
    relays.queue.close()


def settle():
    gevent.sleep(0.02)


def test_end_between_packets_sends_both_goodbyes(hub):
    pair = Pair(hub)
    ping = P.pingreq()
    pair.client.sendall(ping)
    settle()
    pair.relay.end_at_boundary(disconnect(5), disconnect(5, SERVER_SHUTTING_DOWN), 5.0)
    assert pair.read_all(pair.broker) == ping + BROKER_BYE
    assert pair.read_all(pair.client) == CLIENT_BYE_V5
    assert pair.done and pair.done[0].reason == "eof"
    pair.close()


def test_end_in_the_middle_of_a_client_packet_waits_for_its_end(hub):
    pair = Pair(hub)
    publish = P.publish("t/a", b"p" * 3000, qos=1)
    after = P.publish("t/b", b"too late", qos=1)
    pair.client.sendall(publish[:1000])
    settle()
    pair.relay.end_at_boundary(BROKER_BYE, None, 5.0)  # an MQTT 3.1.1 client: no goodbye to it
    settle()
    pair.client.sendall(publish[1000:] + after)  # the rest, and one packet too many
    assert pair.read_all(pair.broker) == publish + BROKER_BYE
    assert pair.read_all(pair.client) == b""
    pair.close()


def test_end_in_the_middle_of_a_broker_packet(hub):
    pair = Pair(hub)
    publish = P.publish("t/x", b"q" * 500)
    pair.broker.sendall(publish[:7])
    settle()
    pair.relay.end_at_boundary(BROKER_BYE, CLIENT_BYE_V5, 5.0)
    settle()
    pair.broker.sendall(publish[7:] + P.publish("t/y", b"dropped"))
    assert pair.read_all(pair.client) == publish + CLIENT_BYE_V5
    assert pair.read_all(pair.broker) == BROKER_BYE
    pair.close()


def test_end_inside_a_large_spliced_body(hub):
    """A 1 MiB PUBLISH body moves with splice(2); the end still lands after it."""
    pair = Pair(hub)
    publish = P.publish("big", b"z" * (1 << 20), qos=1)
    pair.client.setblocking(True)
    sender = gevent.get_hub().threadpool.spawn(pair.client.sendall, publish[:200000])
    received = []
    reader = gevent.spawn(lambda: received.append(pair.read_all(pair.broker, 10)))
    sender.get(timeout=10)
    settle()
    pair.relay.end_at_boundary(BROKER_BYE, None, 5.0)
    gevent.get_hub().threadpool.spawn(pair.client.sendall, publish[200000:] + P.pingreq()
                                      ).get(timeout=10)
    reader.join(timeout=10)
    assert received and len(received[0]) == len(publish) + 2
    assert received[0] == publish + BROKER_BYE
    pair.close()


def test_end_gives_up_after_the_grace_period(hub):
    hub.sweep_interval = 0.05
    pair = Pair(hub)
    publish = P.publish("t", b"s" * 100)
    pair.client.sendall(publish[:10])  # and never the rest
    settle()
    pair.relay.end_at_boundary(BROKER_BYE, None, 0.2)
    deadline = time.monotonic() + 5
    while not pair.done and time.monotonic() < deadline:
        gevent.sleep(0.02)
    assert pair.done and pair.done[0].reason == "end timed out"
    pair.close()


def test_a_non_mqtt_relay_is_closed_at_once(hub):
    pair = Pair(hub, mqtt=False)
    assert pair.relay.end_at_boundary(BROKER_BYE, None, 5.0) is False
    assert pair.done and pair.done[0].reason == "shutdown"
    pair.close()


def test_a_replay_that_ends_inside_a_second_packet_keeps_the_boundaries(hub):
    """The session replays the CONNECT and whatever the client pipelined after it;
    the relay must count those bytes, or it would end in the middle of a packet."""
    connect = P.connect_v311(b"pipelined")
    subscribe = P.packet(0x82, b"\x00\x01" + P.encode_string("t/#") + b"\x00")
    replayed = connect + subscribe[:4]
    client, client_end = socket.socketpair()
    upstream_end, broker = socket.socketpair()
    for s in (client_end, upstream_end):
        s.setblocking(False)
    done = []
    relay = hub.start(client_end, upstream_end, SessionInfo("t-2", "127.0.0.1", 1, "127.0.0.1", 2),
                      done.append, 60.0, mqtt=True, replayed=replayed)
    relay.end_at_boundary(BROKER_BYE, None, 5.0)
    settle()
    client.sendall(subscribe[4:] + P.pingreq())
    assert Pair.read_all(broker) == subscribe[4:] + BROKER_BYE
    client.close()
    broker.close()


@pytest.mark.skipif(not PEEK_WALK, reason="this kernel cannot peek at an offset (SO_PEEK_OFF)")
def test_a_run_of_16k_publishes_is_walked_and_ends_between_two_of_them(hub):
    """The bulk case: 16 KiB PUBLISHes are walked (headers peeked, bytes spliced),
    and an end asked in the middle of the run still lands between two of them."""
    pair = TcpPair(hub)
    publishes = [P.publish("bulk/%d" % i, bytes([65 + i % 26]) * 16384) for i in range(200)]
    stream = b"".join(publishes)
    received = []
    reader = gevent.spawn(lambda: received.append(pair.read_all(pair.broker, 20)))
    sender = send_in_thread(pair.client, stream[:len(stream) // 2])
    modes = set()
    deadline = time.monotonic() + 10
    while pair.info.bytes_in < len(stream) // 2 and time.monotonic() < deadline:
        modes.add(pair.relay.up.splicing)
        gevent.sleep(0.0005)
    sender.join(10)
    assert WALK in modes
    assert pair.relay.up.track.packets > 50
    pair.relay.end_at_boundary(BROKER_BYE, None, 5.0)
    send_in_thread(pair.client, stream[len(stream) // 2:]).join(10)
    reader.join(timeout=20)
    got = received[0]
    assert got.endswith(BROKER_BYE)
    whole = got[:-len(BROKER_BYE)]
    assert stream.startswith(whole)
    ends = set()
    pos = 0
    for pkt in publishes:
        pos += len(pkt)
        ends.add(pos)
    assert len(whole) in ends and len(whole) >= len(stream) // 2 - 16384
    pair.close()


def test_bulk_bytes_of_a_plain_tcp_route_are_spliced_unchanged(hub):
    """No packet boundaries to keep: after a large read everything goes by splice(2)."""
    import os

    from gproxy.proxy.relay.direction import ALL
    pair = TcpPair(hub, mqtt=False)
    data = os.urandom(4 << 20)
    sender = send_in_thread(pair.client, data)
    got = b""
    pair.broker.setblocking(False)
    deadline = time.monotonic() + 20
    while len(got) < len(data) and time.monotonic() < deadline:
        try:
            got += pair.broker.recv(1 << 20)
        except BlockingIOError:
            gevent.sleep(0.002)
    sender.join(5)
    assert got == data and pair.relay.up.splicing == ALL
    assert pair.info.bytes_in == len(data)
    pair.close()
