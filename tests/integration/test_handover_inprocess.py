"""runtime.handover's Giver and Taker in one process, two data paths on one hub.

The sessions are real relays on socket pairs, registered as the session room
registers them; the wire is a real Unix socketpair carrying real descriptors.
What this adds to the process tests: sessions that change between the
pre-copy and the freeze, and what a process hands over besides sessions
(counters, health, limits), checked field by field.  One ends in the giver after its descriptors went
ahead (the taker must close its copies, so the client sees the end), and one
starts relaying after it (it must move with its descriptors in the freeze).
"""

import socket

import gevent
import pytest

from bench.dataplane import data_path, relaying
from gproxy.model.health import TCP_FAILURE
from gproxy.model.routes import RouteTable
from gproxy.proxy.session.limits import Slot
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


def hand_over(old, new):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    taker = handover.Taker(new, Wire(gevent.socket.socket(fileno=b.detach())))
    giver = handover.Giver(old, Wire(gevent.socket.socket(fileno=a.detach())))
    took = gevent.spawn(lambda: (taker.listeners(), taker.take())[1])
    giver.prepare(settle=0)
    giver.commit()
    return took.get(timeout=10)


def test_counters_health_and_limits_carry_over():
    checks = {"active": {"type": "tcp"}}
    nodes = {"10.0.0.1:1883": 1, "10.0.0.2:1883": 1}
    old, new = data_path(), data_path()
    for app in (old, new):
        app.health.sync(RouteTable([{"id": 7, "upstream": {"nodes": nodes, "checks": checks}}]))
    state = old.health.checkers["/apisix/stream_routes/7"].state
    for _ in range(2):  # two TCP failures: unhealthy
        state.report("10.0.0.2:1883", TCP_FAILURE)
    old.registry.reject("limit_conn")
    old.registry.dialled("10.0.0.1:1883", 0.003)
    new.registry.reject("limit_conn")  # the taker's own count adds up with the giver's
    old.proxy.limits.bucket("7", {"rate": 5, "burst": 1}).allow("10.9.9.9", 1000.0)
    client, broker, session = relaying(old, "limited")
    key = ("7", "10.9.9.9")
    old.proxy.limits.acquire(key)
    session.cleanup.append(Slot(old.proxy.limits, key))
    before = old.registry.stats()
    assert hand_over(old, new) == 1
    after = new.registry.stats()
    assert after["sessions_total"] == before["sessions_total"] == 1
    assert after["rejected"] == {"limit_conn": 2}
    assert after["dial_buckets"] == before["dial_buckets"]
    assert after["started_at"] == before["started_at"]
    assert not new.health.checkers["/apisix/stream_routes/7"].state.is_healthy("10.0.0.2:1883")
    assert new.health.report() == old.health.report()
    assert new.proxy.limits.conns == {key: 1} and old.proxy.limits.conns == {}
    bucket = new.proxy.limits.rates[("7", 5, 1)]
    assert bucket.buckets["10.9.9.9"] == (1.0, 1000.0)
    for app in (old, new):
        app.proxy.relays.close_all()
    client.close()
    broker.close()
