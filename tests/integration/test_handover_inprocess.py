"""runtime.handover's Giver and Taker in one process, two data paths on one hub.

The sessions are real relays on socket pairs, registered as the session room
registers them; the wire is a real Unix socketpair carrying real descriptors.
What this adds to the process tests: sessions that change between the
pre-copy and the freeze.  One ends in the giver after its descriptors went
ahead (the taker must close its copies, so the client sees the end), and one
starts relaying after it (it must move with its descriptors in the freeze).
"""

import socket

import gevent
import pytest

from bench.dataplane import data_path, relaying
from gproxy.runtime import handover
from gproxy.runtime.wire import Wire
from tests import packets as P

pytestmark = pytest.mark.timeout(30)


def recv_soon(sock, timeout=5.0):
    """What ``sock`` receives next (b"" at its end), letting the hub run meanwhile."""
    sock.setblocking(False)
    for _ in range(int(timeout / 0.01)):
        try:
            return sock.recv(100)
        except BlockingIOError:
            gevent.sleep(0.01)
    raise AssertionError("nothing within %.0fs" % timeout)


def test_sessions_that_change_between_pre_copy_and_freeze(monkeypatch):
    old, new = data_path(), data_path()
    ends = {name: relaying(old, name) for name in ("stays", "ends")}
    staged = handover.Giver._stage

    def stage_then_change(giver, share):
        staged(giver, share)
        ends["late"] = relaying(old, "late")  # relays only after the pre-copy
        ends["ends"][2].relay.abort("eof")  # ends in the giver after it
        gevent.sleep(0.02)
    monkeypatch.setattr(handover.Giver, "_stage", stage_then_change)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    taker = handover.Taker(new, Wire(gevent.socket.socket(fileno=b.detach())))
    giver = handover.Giver(old, Wire(gevent.socket.socket(fileno=a.detach())))

    def take():
        taker.listeners()
        return taker.take()
    took = gevent.spawn(take)
    assert giver.prepare(settle=0) == 2
    assert giver.commit() == 2
    assert took.get(timeout=10) == 2
    assert sorted(i.client_id for i in new.registry.query()[1]) == ["late", "stays"]
    assert len(old.registry) == 0 and old.gate.open == 0 and new.gate.open == 2
    for name in ("stays", "late"):  # both relay in the new data path
        client, broker, _ = ends[name]
        client.sendall(P.pingreq())
        assert recv_soon(broker) == P.pingreq()
    client, broker, _ = ends["ends"]
    assert recv_soon(client) == b""  # the taker let go of its copy: the end reached it
    for client, broker, _ in ends.values():
        client.close()
        broker.close()
    for app in (old, new):
        app.proxy.relays.close_all()
