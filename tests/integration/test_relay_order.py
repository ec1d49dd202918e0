"""The relay keeps the order in which bytes of different sessions arrived.

libev runs the I/O callbacks of one loop iteration last-in first-out; a relay
that forwards from inside those callbacks sends later bytes first whenever two
sessions' bytes arrive within one iteration (a SUBSCRIBE from client B then a
PUBLISH from client A reach the broker swapped, and B misses the message).
Here several relays run in this process on socket pairs; the test writes to
their clients in a known order while the hub is not running, so all of them
are ready in the same iteration, then lets the hub run once and records the
order in which the relays sent upstream.
"""

import itertools
import socket

import gevent
import pytest

from gproxy.proxy.relay.hub import RelayHub
from gproxy.proxy.sessions.registry import SessionInfo


class RecordingEnd:
    """An upstream endpoint that notes which session sent, in order, then sends."""

    def __init__(self, sock, name, log):
        self.sock, self.name, self.log = sock, name, log

    def fileno(self):
        return self.sock.fileno()

    def setblocking(self, flag):
        self.sock.setblocking(flag)

    def recv_into(self, buf, *args):
        return self.sock.recv_into(buf, *args)

    def send(self, data):
        self.log.append(self.name)
        return self.sock.send(data)

    def shutdown(self, how):
        self.sock.shutdown(how)

    def close(self):
        self.sock.close()


@pytest.fixture
def relays():
    hub = RelayHub()
    made = []

    def make(count, log):
        ends = []
        for name in range(count):
            client, client_end = socket.socketpair()
            upstream_end, broker = socket.socketpair()
            info = SessionInfo(str(name), "127.0.0.1", 1, "127.0.0.1", 2)
            hub.start(client_end, RecordingEnd(upstream_end, name, log), info,
                      lambda relay: None, 60.0)
            ends.append((client, broker))
            made.append((client, broker))
        gevent.sleep(0.01)  # one loop iteration: every watcher is registered
        return ends

    yield make
    hub.close_all()
    hub.queue.close()
    for client, broker in made:
        client.close()
        broker.close()


def wait_for(predicate, timeout=5.0):
    """Let the hub run until ``predicate()`` holds (bounded), instead of a fixed sleep."""
    with gevent.Timeout(timeout, AssertionError("condition not met within %.1fs" % timeout)):
        while not predicate():
            gevent.sleep(0.001)


@pytest.mark.parametrize("order", [(2, 0, 3, 1), (0, 1, 2, 3), (3, 2, 1, 0), (1, 3, 0, 2, 4)])
def test_bytes_of_different_sessions_go_upstream_in_arrival_order(relays, order):
    log = []
    ends = relays(len(order), log)
    for name in order:  # the hub is not running: all become ready in one iteration
        ends[name][0].send(b"x")
    wait_for(lambda: len(log) >= len(order))
    assert log == list(order)
    for name in order:
        assert ends[name][1].recv(10) == b"x"


def test_order_holds_over_many_shuffled_rounds(relays):
    log = []
    ends = relays(6, log)
    expected = []
    for round_, order in zip(range(20), itertools.cycle(itertools.permutations(range(6)))):
        for name in order:
            ends[name][0].send(b"%d" % round_)
        expected.extend(order)
        wait_for(lambda: len(log) >= len(expected))  # this round is out before the next
    assert log == expected
