"""relay.handoff: a relay quiesced in one RelayHub and resumed in another loses,
duplicates and reorders no byte, whatever it held at that moment.

Relays run in this process on socket pairs; the "other process" is a second
RelayHub given the descriptors through SCM_RIGHTS (socket.send_fds), with the
state through JSON, exactly as runtime.handover sends them.  The test plays the
client and the broker and checks byte for byte what each side received.

The splicing modes have their own tests, on loopback TCP with C-level sockets
as sessions hand the relay: a relay frozen while walking a run of 16 KiB
PUBLISHes with bytes held in its splice pipe, mid-body while splicing one
large body, and mid-header while walking; each is moved (or restarted) and
must deliver every byte once and in order, then still end at a packet
boundary.
"""

import _socket
import json
import os
import socket
import time

import gevent
import pytest

from gproxy.protocols import wsframe
from gproxy.proxy.relay import handoff
from gproxy.proxy.relay.direction import BODY, PEEK_WALK, WALK
from gproxy.proxy.relay.hub import RelayHub
from gproxy.proxy.relay.wsendpoint import WebSocketEndpoint
from gproxy.proxy.sessions.registry import SessionInfo
from tests import packets as P
from tests.integration.test_relay_end import BROKER_BYE, Pair, send_in_thread

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


def move(relay, new_hub, done, exported=None):
    """Hand ``relay`` over as the runtime does: state as JSON, descriptors by SCM_RIGHTS
    (``exported``: a list that gets the state as it went on the wire)."""
    state = handoff.export(relay)
    assert state is not None
    if exported is not None:
        exported.append(state)
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
    relay.end_at_boundary(BROKER_BYE, None, 5.0)  # a clean end in the new hub: boundary known
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
    pair.relay.end_at_boundary(BROKER_BYE, None, 5.0)
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
    moved.end_at_boundary(BROKER_BYE, None, 5.0)
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
    pair.relay.end_at_boundary(BROKER_BYE, None, 5.0)  # waits for the boundary
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


# -- the splicing modes ---------------------------------------------------------------------
needs_walk = pytest.mark.skipif(not PEEK_WALK,
                                reason="this kernel cannot peek at an offset (SO_PEEK_OFF)")


def _tcp(buffers=None):
    """Two connected loopback TCP sockets: (the test's end, a C-level non-blocking end);
    ``buffers``: bytes of the test end's receive and the other end's send buffer (fixed,
    so the kernel does not grow them to hold a whole test's stream)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        ours = socket.socket()
        if buffers:
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffers)
        ours.connect(listener.getsockname())
        theirs, _ = listener.accept()
    raw = _socket.socket(theirs.family, theirs.type, theirs.proto, theirs.detach())
    if buffers:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffers)
    raw.setblocking(False)
    return ours, raw


class Bulk:
    """A relay on loopback TCP, and a reader of the broker's side that can stop
    reading (so what the relay splices next waits in its pipe)."""

    def __init__(self, hub, walkable=True):
        self.client, client_end = _tcp()
        self.broker, upstream_end = _tcp(buffers=256 * 1024)
        self.info = SessionInfo("t-bulk", "127.0.0.1", 1, "127.0.0.1", 2)
        self.done = []
        self.relay = hub.start(client_end, upstream_end, self.info, self.done.append, 60.0,
                               mqtt=True)
        self.relay.up.walkable = walkable  # False: as on a kernel without SO_PEEK_OFF
        self.got = bytearray()
        self.reading = True
        self.ended = False
        self.broker.setblocking(False)
        self.reader = gevent.spawn(self._read)

    def _read(self):
        deadline = time.monotonic() + 25
        while time.monotonic() < deadline:
            if not self.reading:
                gevent.sleep(0.002)
                continue
            try:
                chunk = self.broker.recv(1 << 20)
            except BlockingIOError:
                gevent.sleep(0.002)
                continue
            if not chunk:
                self.ended = True
                return
            self.got += chunk

    def wait(self, predicate, what, timeout=10.0):
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, "never: %s" % what
            gevent.sleep(0.001)

    def hold_in_pipe(self, mode):
        """Once the relay moves bytes in ``mode``, stop reading until some wait in its pipe."""
        up = self.relay.up
        self.wait(lambda: up.splicing == mode, "splicing mode %d" % mode)
        self.reading = False
        self.wait(lambda: up.splicing == mode and isinstance(up.backlog, int) and up.backlog,
                  "bytes waiting in the pipe")

    def sent(self, thread):
        """Wait, letting the hub relay meanwhile, until ``thread`` sent everything."""
        self.reading = True
        self.wait(lambda: not thread.is_alive(), "the sender done", timeout=20)

    def finish(self, relay, sent):
        """Everything sent has moved: end cleanly; the broker got it all, then the goodbye."""
        self.reading = True
        self.wait(lambda: self.info.bytes_in == len(sent), "all bytes relayed")
        assert relay.end_at_boundary(BROKER_BYE, None, 5.0)
        self.reader.join(20)
        assert self.ended
        assert bytes(self.got) == sent + BROKER_BYE  # once, in order, ending at a boundary
        self.client.close()
        self.broker.close()


def _publishes(count, size=16384):
    return [P.publish("bulk/%d" % i, bytes([65 + i % 26]) * size) for i in range(count)]


@needs_walk
def test_a_walking_relay_moves_with_bytes_held_in_its_splice_pipe(hubs):
    old, new = hubs
    bulk = Bulk(old)
    stream = b"".join(_publishes(256))  # 4 MiB of 16 KiB PUBLISHes
    sender = send_in_thread(bulk.client, stream)
    bulk.hold_in_pipe(WALK)
    exported = []
    relay = move(bulk.relay, new, bulk.done, exported)
    state = exported[0]["up"]
    assert state["mode"] == "walk" and state["piped"] > 0
    assert len(handoff.unpack(state["backlog"])) == state["piped"]  # out of the pipe, as bytes
    old_up, old_down = bulk.relay.up, bulk.relay.down
    assert old_up.relay is old_down.relay is None  # released: no cycle keeps it alive
    assert old_up.pipe is None and old_up.reader is None
    bulk.sent(sender)
    bulk.finish(relay, stream)


@needs_walk
def test_a_failed_handover_of_a_walking_relay_sends_its_piped_bytes_here(hubs):
    old, _ = hubs
    bulk = Bulk(old)
    stream = b"".join(_publishes(256))
    sender = send_in_thread(bulk.client, stream)
    bulk.hold_in_pipe(WALK)
    state = handoff.export(bulk.relay)
    assert state["up"]["piped"] > 0 and isinstance(bulk.relay.up.backlog, bytes)
    bulk.reading = True
    gevent.sleep(0.05)  # more arrives while nothing runs
    handoff.restart(bulk.relay)
    bulk.sent(sender)
    bulk.finish(bulk.relay, stream)


def test_a_relay_moves_in_the_middle_of_a_spliced_body(hubs):
    """Without SO_PEEK_OFF (or with it off for the socket) only the rest of a large
    body is spliced (BODY): frozen in the middle of one, the tracker carries how much
    of it is still to come, and the new process's relay copies it on to its end."""
    old, new = hubs
    bulk = Bulk(old, walkable=False)
    publish = P.publish("big", b"b" * (4 << 20), qos=1, packet_id=9)
    sent = publish + P.pingreq()
    sender = send_in_thread(bulk.client, publish[:3 << 20])
    bulk.hold_in_pipe(BODY)
    exported = []
    relay = move(bulk.relay, new, bulk.done, exported)
    state = exported[0]["up"]
    assert state["mode"] == "body" and state["piped"] > 0
    assert 0 < state["track"]["left"] < len(publish)  # mid-body, counted through the backlog
    bulk.sent(sender)
    bulk.sent(send_in_thread(bulk.client, sent[3 << 20:]))
    bulk.finish(relay, sent)


@needs_walk
def test_a_walking_relay_moves_with_half_a_header_taken(hubs):
    """A walk takes the first bytes of a header cut short (they are spliced with the
    rest): the tracker carries them, and the packet's boundary is found after the move."""
    old, new = hubs
    bulk = Bulk(old)  # the broker keeps up: nothing waits in the pipe here
    publishes = _publishes(8)
    run = b"".join(publishes)
    next_one = P.publish("bulk/last", b"z" * 16384)
    bulk.sent(send_in_thread(bulk.client, run))
    up = bulk.relay.up
    bulk.wait(lambda: bulk.info.bytes_in == len(run) and up.splicing == WALK, "walked the run")
    bulk.client.sendall(next_one[:1])  # the first byte of the next header
    bulk.wait(lambda: bulk.info.bytes_in == len(run) + 1, "took the header's first byte")
    exported = []
    relay = move(bulk.relay, new, bulk.done, exported)
    state = exported[0]["up"]
    assert state["mode"] == "walk" and state["track"]["header"] == handoff.pack(next_one[:1])
    assert state["track"]["left"] == 0
    bulk.sent(send_in_thread(bulk.client, next_one[1:] + P.pingreq()))
    bulk.finish(relay, run + next_one + P.pingreq())


def test_release_drops_the_moved_relay_watchers_and_all(hubs):
    """After ``release`` the old process's relay holds no watcher, pipe or reference
    cycle (the CLI freezes live sessions out of the collector: a cycle would be kept
    forever), and the descriptors it had are closed here, not in the other process."""
    old, _ = hubs
    pair = Pair(old)
    settle()
    fds = [os.dup(fd) for fd in handoff.descriptors(pair.relay)]
    handoff.export(pair.relay)
    handoff.release(pair.relay)
    for d in (pair.relay.up, pair.relay.down):
        assert d.relay is None and d.reader is None and d.writer is None and d.pipe is None
    assert pair.relay.on_done is None and pair.relay.slot is None
    assert not old.relays  # out of the sweeper's slots
    handoff.close_fds(fds)
    pair.close()
