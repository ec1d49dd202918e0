"""relay.handoff: a relay quiesced in one RelayHub and resumed in another loses,
duplicates and reorders no byte, whatever it held at that moment.

Relays run in this process on socket pairs; the "other process" is a second
RelayHub given the descriptors through SCM_RIGHTS (socket.send_fds), with the
state through JSON, exactly as runtime.handover sends them.  The test plays the
client and the broker and checks byte for byte what each side received.
"""

import json
import os
import socket

import gevent
import pytest

from gproxy.protocols import wsframe
from gproxy.proxy.relay import handoff
from gproxy.proxy.relay.hub import RelayHub
from gproxy.proxy.relay.wsendpoint import WebSocketEndpoint
from gproxy.proxy.sessions.registry import SessionInfo
from tests import packets as P
from tests.integration.test_relay_end import BROKER_BYE, Pair

pytestmark = pytest.mark.timeout(30)
PUBACK = bytes((0x40, 2, 0, 3))


@pytest.fixture
def hubs():
    made = [RelayHub(), RelayHub()]
    yield made
    for hub in made:
        hub.close_all()
        hub.queue.close()


def settle():
    gevent.sleep(0.03)


def move(relay, new_hub, done):
    """Hand ``relay`` over as the runtime does: state as JSON, descriptors by SCM_RIGHTS."""
    state = handoff.export(relay)
    assert state is not None
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        socket.send_fds(a, [b"x"], list(handoff.descriptors(relay)))
        _, fds, _, _ = socket.recv_fds(b, 1, 2)
    finally:
        a.close()
        b.close()
    state = json.loads(json.dumps(state))
    handoff.release(relay)  # the old process lets go before the new one moves a byte
    client, upstream = handoff.endpoints(handoff.sockets(fds), state, new_hub.loop)
    moved = handoff.resume(new_hub, client, upstream, relay.info, done.append, state)
    moved.start()
    return moved


def test_a_packet_split_across_the_handover_arrives_whole_and_ends_at_its_boundary(hubs):
    old, new = hubs
    pair = Pair(old)
    publish = P.publish("a/b", b"p" * 300, qos=1, packet_id=7)
    pair.client.sendall(publish[:100])
    settle()
    relay = move(pair.relay, new, pair.done)
    assert relay.up.track.left == len(publish) - 100 - 0  # mid-packet, where it stood
    pair.client.sendall(publish[100:])
    settle()
    relay.end(BROKER_BYE, None, 5.0)  # a clean end in the new hub: the boundary is known
    assert pair.read_all(pair.broker) == publish + BROKER_BYE
    assert pair.info.bytes_in == len(publish)
    pair.close()


def test_a_backlog_the_broker_had_not_taken_is_delivered_in_order(hubs):
    old, new = hubs
    pair = Pair(old, mqtt=False)
    pair.broker.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sent = bytearray()
    chunk = bytes(range(256)) * 64
    pair.client.setblocking(False)
    for i in range(400):  # until the relay holds bytes the broker did not take
        try:
            n = pair.client.send(chunk[i % 7:])
            sent += chunk[i % 7:][:n]
        except BlockingIOError:
            pass
        settle() if i % 20 == 0 else None
        if pair.relay.up.backlog is not None:
            break
    assert pair.relay.up.backlog is not None, "the relay never held a backlog"
    relay = move(pair.relay, new, pair.done)
    pair.client.shutdown(socket.SHUT_WR)
    got = pair.read_all(pair.broker, timeout=10)
    assert got == bytes(sent)
    assert relay.reason is None or relay.reason == "eof"
    pair.close()


def test_a_failed_handover_restarts_the_relay_where_it_stood(hubs):
    old, _ = hubs
    pair = Pair(old)
    pair.client.sendall(P.pingreq()[:1])
    settle()
    state = handoff.export(pair.relay)
    pair.client.sendall(P.pingreq()[1:] + P.pingreq())  # arrives while nothing runs
    settle()
    handoff.restart(pair.relay)
    settle()
    pair.relay.end(BROKER_BYE, None, 5.0)
    assert pair.read_all(pair.broker) == P.pingreq() * 2 + BROKER_BYE
    assert state["up"]["track"]["header"] == {"b": "wA=="}  # half a header was in hand
    pair.close()


def test_a_websocket_session_moves_mid_frame(hubs):
    old, new = hubs
    client, client_end = socket.socketpair()
    upstream_end, broker = socket.socketpair()
    for s in (client_end, upstream_end):
        s.setblocking(False)
    endpoint = WebSocketEndpoint(client_end, wsframe.FrameParser(masked=True), old.loop)
    info = SessionInfo("t-2", "127.0.0.1", 1, "127.0.0.1", 2)
    done = []
    relay = old.start(endpoint, upstream_end, info, done.append, 60.0, mqtt=True)
    publish = P.publish("ws/t", b"w" * 200, qos=1, packet_id=3)
    frame = wsframe.encode_frame(wsframe.BINARY, publish, mask=b"\x01\x02\x03\x04")
    client.sendall(frame[:57])  # the header, the mask and part of the payload
    settle()
    moved = move(relay, new, done)
    assert isinstance(moved.client, WebSocketEndpoint)
    client.sendall(frame[57:])
    broker.sendall(PUBACK)
    settle()
    moved.end(BROKER_BYE, None, 5.0)
    assert Pair.read_all(broker) == publish + BROKER_BYE
    client.setblocking(False)
    head = client.recv(2)
    assert head == wsframe.frame_header(wsframe.BINARY, len(PUBACK))
    assert client.recv(100)[:len(PUBACK)] == PUBACK
    for s in (client, broker):
        s.close()


def test_a_relay_that_is_ending_or_ended_does_not_move(hubs):
    old, _ = hubs
    pair = Pair(old)
    pair.client.sendall(P.publish("a", b"x" * 50)[:10])
    settle()
    pair.relay.end(BROKER_BYE, None, 5.0)  # waits for the boundary
    assert not handoff.movable(pair.relay)
    assert handoff.export(pair.relay) is None
    pair.relay.abort("test")
    assert not handoff.movable(pair.relay)
    pair.close()


def _watched(loop):
    """Descriptor numbers in the loop's epoll set (/proc's fdinfo lists each as ``tfd:``)."""
    with open("/proc/self/fdinfo/%d" % loop.fileno()) as fh:
        return {int(line.split()[1]) for line in fh if line.startswith("tfd:")}


def test_release_closes_no_connection_the_other_process_holds(hubs):
    old, _ = hubs
    pair = Pair(old)
    settle()
    mine = handoff.descriptors(pair.relay)  # (the client's, the node's)
    assert set(mine) <= _watched(old.loop)
    fds = [os.dup(fd) for fd in mine]
    handoff.export(pair.relay)
    handoff.release(pair.relay)
    # out of the epoll set, though the sockets live on in the other descriptors
    assert not set(mine) & _watched(old.loop)
    pair.client.setblocking(False)
    pair.client.sendall(b"still here")
    settle()
    with pytest.raises(BlockingIOError):
        pair.client.recv(10)  # no FIN: the connection lives on in the other descriptors
    assert os.read(fds[0], 100) == b"still here"
    handoff.close_fds(fds)
    pair.close()
