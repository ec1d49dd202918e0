"""runtime.handover's Giver and Taker in one process, two data paths on one hub.

The sessions are real relays on socket pairs, registered as the session room
registers them; the wire is a real Unix socketpair carrying real descriptors.
What this adds to the process tests: sessions that change between the
pre-copy and the freeze, and what a process hands over besides sessions
(counters, health, limits), checked field by field.  One ends in the giver after its descriptors went
ahead (the taker must close its copies, so the client sees the end), and one
starts relaying after it (it must move with its descriptors in the freeze).
"""

import os
import socket

import gevent
import pytest

from bench.dataplane import data_path, relaying
from gproxy.errors import StoreUnavailable
from gproxy.model.balancer import Balancer, Node
from gproxy.model.health import TCP_FAILURE
from gproxy.model.routes import RouteTable
from gproxy.proxy.session.limits import Slot
from gproxy.runtime import handover
from gproxy.runtime.wire import Wire
from gproxy.store.file import FileStore
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
        ends["ends"][2].abort("eof")  # ends in the giver after it (the relay is the session)
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
    old.proxy.limits.bucket("7", {"rate": 5, "burst": 1}, 1000.0).allow("10.9.9.9", 1000.0)
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
    bucket = new.proxy.limits.rates["7"]
    assert (bucket.rate, bucket.burst, bucket.last) == (5.0, 1, 1000.0)
    assert bucket.buckets["10.9.9.9"] == (1.0, 1000.0)
    for app in (old, new):
        app.proxy.relays.close_all()
    client.close()
    broker.close()


def whole_hand_over(old, new):
    """As a live upgrade of a whole gproxy does it: the store, jobs and fleet too."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    taker = handover.Taker(new, Wire(gevent.socket.socket(fileno=b.detach())))
    giver = handover.Giver(old, Wire(gevent.socket.socket(fileno=a.detach())), top=True)
    took = gevent.spawn(lambda: (taker.listeners(), taker.take())[1])
    giver.prepare(settle=0)
    giver.commit()
    return took.get(timeout=10)


def test_least_conn_counts_and_ewma_latencies_carry_over():
    """A moved session goes on counting on its node in the new process (its next
    least_conn pick avoids that node) and gives the count back when it ends there."""
    nodes = [Node("10.0.0.1", 1883), Node("10.0.0.2", 1883)]
    old, new = data_path(), data_path()
    least = Balancer(nodes, "least_conn", name="/apisix/upstreams/u", shared=old.balancing)
    client, broker, session = relaying(old, "counted")
    session.cleanup.append(least.acquire(nodes[0]))
    old.balancing.ewma.observe("10.0.0.2:1883", 0.040)
    assert hand_over(old, new) == 1
    assert dict(old.balancing.least_conn["/apisix/upstreams/u#0"].conns) == {}  # let go
    counts = new.balancing.least_conn["/apisix/upstreams/u#0"]
    assert counts.conns == {"10.0.0.1:1883": 1}
    rebuilt = Balancer(nodes, "least_conn", name="/apisix/upstreams/u", shared=new.balancing)
    assert next(rebuilt.candidates(None, 1)).addr == "10.0.0.2:1883"  # .1 holds one
    assert new.balancing.ewma.score("10.0.0.2:1883") == pytest.approx(
        old.balancing.ewma.score("10.0.0.2:1883"), rel=0.05)
    client.close()  # the session ends in the new process: its count goes with it
    broker.close()
    assert wait(lambda: counts.conns == {})
    for app in (old, new):
        app.proxy.relays.close_all()


def wait(predicate, timeout=5.0):
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return True
        gevent.sleep(0.01)
    return False


def test_an_eviction_job_pauses_at_the_freeze_and_goes_on_in_the_new_process():
    old, new = data_path(), data_path()
    ends = [relaying(old, "evict-%d" % i) for i in range(4)]
    job = old.live().evictions.start({}, rate=4.0)  # one now, then one every 0.25 s
    assert wait(lambda: job.done >= 1)
    assert whole_hand_over(old, new) == 4 - job.done
    assert job.state == "moved"  # it stopped in the old process...
    moved = new.live().evictions.get(job.id)  # ...and goes on under the same id here
    assert moved is not None and moved is not job
    assert wait(lambda: moved.state == "done")
    assert (moved.done, moved.gone, moved.failed) == (4, 0, 0)  # every one ended once
    assert len(new.registry) == 0
    assert new.live().evictions.start({}).id != job.id  # new jobs get new ids
    for client, broker, _ in ends:
        client.close()
        broker.close()
    for app in (old, new):
        app.proxy.relays.close_all()


def test_the_store_passes_to_the_new_process_and_no_write_is_lost(tmp_path):
    """The new process reads the file store standby (touching neither file); the old
    one writes on until the commit, then folds and writes no more; the new one
    reads what it missed and writes from then on, and the old one's exit leaves
    its writes alone."""
    path = str(tmp_path / "apisix.yaml")
    up = lambda n: {"id": str(n), "type": "roundrobin", "nodes": {"10.0.0.%d:1883" % n: 1}}  # noqa: E731
    old_store = FileStore(path)
    old_store.put("upstreams", "1", up(1))  # in the journal, not folded yet
    new_store = FileStore(path, standby=True)  # the new process starts
    assert os.path.exists(path + ".journal")  # left to its writer
    assert [r.id for r in new_store.list("upstreams")] == ["1"]
    with pytest.raises(StoreUnavailable):
        new_store.put("upstreams", "9", up(9))
    old_store.put("upstreams", "2", up(2))  # an Admin write to the old one meanwhile
    old, new = data_path(old_store), data_path(new_store)
    heard = []
    new_store.subscribe(heard.append)
    client, broker, _ = relaying(old, "store")
    assert whole_hand_over(old, new) == 1
    assert sorted(r.id for r in new_store.list("upstreams")) == ["1", "2"]
    assert ("upstreams", "2") in [(k, i) for batch in heard for k, i, _ in batch]
    with pytest.raises(StoreUnavailable):  # the old one writes no more
        old_store.put("upstreams", "8", up(8))
    new_store.put("upstreams", "3", up(3))  # acknowledged by the new one...
    old_store.close()  # ...before the old one exits
    new_store.put("upstreams", "4", up(4))
    assert sorted(r.id for r in new_store.list("upstreams")) == ["1", "2", "3", "4"]
    new_store.close()
    assert sorted(r.id for r in FileStore(path).list("upstreams")) == ["1", "2", "3", "4"]
    client.close()
    broker.close()
    for app in (old, new):
        app.proxy.relays.close_all()


def test_the_idle_sweeper_runs_for_sessions_a_new_process_only_adopted():
    """A new process may run nothing but adopted sessions: its idle sweeper must start
    with them (the idle timeout carried with each relay, and its clock), or a session
    gone silent would never be ended there."""
    old, new = data_path(), data_path()
    new.proxy.relays.sweep_interval = 0.05
    client, broker, relay = relaying(old, "idles")
    relay.idle = 0.3  # (carried: the new relay idles out on the old one's terms)
    assert hand_over(old, new) == 1
    assert len(new.registry) == 1
    assert recv_soon(client, timeout=5) == b""  # idled out: gproxy closed the client
    assert wait(lambda: len(new.registry) == 0)
    client.close()
    broker.close()
    for app in (old, new):
        app.proxy.relays.close_all()
