"""The HTTP listeners' table of connections and their one-line-a-second summary.

``gproxy.admin.conns.Conns`` decides which connection gives way at the cap
and when a state's deadline closes one; ``gproxy.admin.tally.CloseTally``
folds the closes into log lines.  Both run here on a fake loop whose timers
fire when the test says, with fake descriptors: no sockets, no clock.
"""

import logging

import pytest

from gproxy.admin.conns import BUSY, READING, WAITING, WRITING, Conns
from gproxy.admin.tally import CloseTally


class FakeTimer:
    def __init__(self, loop, seconds):
        self.loop, self.seconds, self.callback = loop, seconds, None

    def start(self, callback, *args):
        self.callback = (callback, args)
        self.loop.armed.append(self)

    def stop(self):
        if self in self.loop.armed:
            self.loop.armed.remove(self)

    def fire(self):
        assert self in self.loop.armed, "a stopped timer fired"
        self.stop()
        callback, args = self.callback
        callback(*args)


class FakeLoop:
    def __init__(self):
        self.armed = []

    def timer(self, seconds):
        return FakeTimer(self, seconds)


class FakeSock:
    fds = iter(range(100, 100000))

    def __init__(self):
        self.fd = next(self.fds)

    def fileno(self):
        return self.fd


class Table:
    """A ``Conns`` with fake descriptors: ``ready`` are the fds with bytes waiting."""

    def __init__(self, limit=3, idle=30.0, request=10.0):
        self.loop = FakeLoop()
        self.ready, self.shut, self.rooms = set(), [], []
        self.conns = Conns(self.loop, limit, idle, request, on_room=lambda: self.rooms.append(1),
                           readable=lambda fd: fd in self.ready,
                           shutdown=self.shut.append)

    def admit(self, client="127.0.0.1", readable=False):
        sock = FakeSock()
        if readable:
            self.ready.add(sock.fd)
        return self.conns.admit(sock, (client, 40000))

    def timer_of(self, conn):
        return conn.timer


def test_a_new_connection_waits_with_the_idle_deadline_and_a_request_with_its_own():
    t = Table(idle=30.0, request=10.0)
    idle, eager = t.admit(), t.admit(readable=True)
    assert (idle.state, eager.state) == (WAITING, READING)
    assert (idle.timer.seconds, eager.timer.seconds) == (30.0, 10.0)
    eager.enter(BUSY)
    assert eager.timer is None, "a running request has no deadline"
    eager.enter(WRITING)
    assert eager.timer.seconds == 10.0


@pytest.mark.parametrize("state, reason", [(WAITING, "idle"), (READING, "request_timeout"),
                                           (WRITING, "send_timeout")])
def test_each_deadline_drops_the_connection_with_its_reason(state, reason):
    t = Table()
    conn = t.admit()
    conn.enter(state)
    conn.timer.fire()
    assert conn.dropped and conn.reason == reason
    assert t.shut == [conn.fd] and t.conns.count == 0


def test_a_state_change_cancels_the_old_deadline():
    t = Table()
    conn = t.admit()
    first = conn.timer
    conn.enter(READING)
    assert first not in t.loop.armed and conn.timer in t.loop.armed
    conn.enter(BUSY)
    assert not t.loop.armed


def test_at_the_cap_the_longest_waiting_connection_gives_way():
    t = Table(limit=3)
    a, b, c = t.admit(), t.admit(), t.admit()
    b.enter(READING)  # b has begun a request: it goes after every idle one
    d = t.admit(readable=True)
    assert a.dropped and a.reason == "reclaimed" and t.shut == [a.fd]
    e = t.admit(readable=True)
    assert c.dropped and not b.dropped
    f = t.admit(readable=True)
    assert b.dropped, "with no idle connection left, the oldest slow one gives way"
    assert t.conns.count == 3 and not any(x.dropped for x in (d, e, f))


def test_a_request_already_there_outlives_idle_ones():
    t = Table(limit=2)
    fresh = t.admit(readable=True)
    flood = [t.admit() for _ in range(50)]
    assert not fresh.dropped and sum(not x.dropped for x in flood) == 1


def test_the_busiest_client_gives_way_first():
    t = Table(limit=4)
    mine = t.admit("127.0.0.1")  # an idle keep-alive connection of the dashboard
    flood = [t.admit("127.0.0.2") for _ in range(100)]
    assert not mine.dropped, "another address's flood displaced this client's connection"
    assert sum(not x.dropped for x in flood) == 3


def test_busy_connections_never_give_way_and_a_full_table_stops_accepting():
    t = Table(limit=2)
    a, b = t.admit(readable=True), t.admit(readable=True)
    a.enter(BUSY)
    assert not t.conns.full()
    b.enter(BUSY)
    assert t.conns.full()
    c = t.admit()  # (the listener would not accept it; the table still never drops a busy one)
    assert not (a.dropped or b.dropped) and t.conns.count == 3
    c.drop("idle")
    a.enter(WRITING)  # a writer may give way again: the listener may accept
    assert not t.conns.full() and t.rooms


def test_release_is_idempotent_and_forgets_the_client():
    t = Table()
    conn = t.admit("10.0.0.1")
    conn.drop("reclaimed")
    t.conns.release(conn)
    t.conns.release(conn)
    assert t.conns.count == 0 and t.conns.clients == {}
    conn.enter(READING)  # a dropped connection's greenlet moving on changes nothing
    assert t.conns.count == 0 and not t.loop.armed


def test_configure_applies_new_limits_and_opens_a_full_listener():
    t = Table(limit=1)
    conn = t.admit(readable=True)
    conn.enter(BUSY)
    assert t.conns.full()
    t.conns.configure(2, 5.0, 1.0)
    assert not t.conns.full() and t.rooms
    assert t.admit().timer.seconds == 5.0


def test_snapshot_counts_states():
    t = Table(limit=10)
    t.admit(), t.admit(readable=True)
    t.admit(readable=True).enter(BUSY)
    assert t.conns.snapshot() == ({WAITING: 1, READING: 1, BUSY: 1, WRITING: 0}, 1)


# -- the summary line --------------------------------------------------------------------

class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def tally(caplog):
    caplog.set_level(logging.INFO, logger="test.tally")
    clock, loop = Clock(), FakeLoop()
    return CloseTally(loop, logging.getLogger("test.tally"), clock=clock), clock, loop, caplog


def test_a_flood_of_closes_is_one_line_a_second(tally):
    t, clock, loop, caplog = tally
    for i in range(1000):
        t.note("admin", "reclaimed" if i % 2 else "idle", "127.0.0.%d" % (1 + i % 2))
        clock.now += 0.0005  # 1,000 closes in half a second
    assert len(caplog.records) == 1, "the first close is told at once"
    assert len(loop.armed) == 1, "the rest wait for one timer, not one each"
    clock.now = 1001.0
    loop.armed[0].fire()
    assert len(caplog.records) == 2
    line = caplog.records[1].getMessage()
    assert line.startswith("http: closed 999 connections in ")
    assert "admin idle=499 reclaimed=500" in line and caplog.records[1].levelname == "WARNING"
    assert line.endswith("; most from 127.0.0.2 (500)"), "idle ones do not count there"
    assert t.totals == {("admin", "idle"): 500, ("admin", "reclaimed"): 500}


def test_idle_timeouts_alone_are_routine(tally):
    t, clock, loop, caplog = tally
    t.note("metrics", "idle", "127.0.0.1")
    (record,) = caplog.records
    assert record.levelname == "INFO"
    assert record.getMessage() == "http: closed 1 connection in 0.0s: metrics idle=1"


def test_flush_with_nothing_pending_writes_nothing(tally):
    t, clock, loop, caplog = tally
    t.flush()
    assert not caplog.records


def test_a_connection_no_greenlet_serves_yet_is_closed_by_the_listener_not_shut():
    t = Table(limit=2)
    closed = []
    t.conns.on_drop = lambda conn: closed.append(conn) or conn.client == "10.0.0.1"
    waiting, served = t.admit("10.0.0.1"), t.admit("10.0.0.2", readable=True)
    waiting.timer.fire()  # the listener closes it itself: no shutdown for a greenlet
    served.timer.fire()   # a greenlet serves this one: it is shut down for it to see
    assert closed == [waiting, served] and t.shut == [served.fd]
