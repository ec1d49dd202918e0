"""The relay's bookkeeping without sockets: byte counts, back-pressure, half-close,
``Relay.end_at_boundary`` and ``abort``.

The relay is driven by a fake loop: its I/O watchers only record whether they
are started, and a test "makes a socket ready" by firing a watcher and running
the ``EventQueue`` as the hub's check watcher would.  Endpoints are scripted
objects with the relay's endpoint interface (``recv_into``/``send`` raising
``BlockingIOError`` for "not now", ``shutdown``, ``close``, ``fileno``); as
they are not kernel sockets the relay never splices (splice and the real hub
are covered in tests/integration: test_proxy_raw.py's bulk and half-close
tests, test_relay_order.py).  MQTT packets come from tests/packets.py.
"""

import errno
import socket

import pytest

from gproxy.proxy.relay.direction import READ, WRITE
from gproxy.proxy.relay.events import BATCH, EventQueue
from gproxy.proxy.relay.hub import RelayHub
from gproxy.proxy.relay.relay import Relay
from gproxy.proxy.sessions.registry import SessionInfo
from tests import packets


class FakeWatcher:
    def __init__(self, fd=None, events=None):
        self.fd, self.events = fd, events
        self.callback = self.args = None
        self.active = False
        self.closed = False
        self.priority = 0

    def start(self, callback, *args):
        self.callback, self.args, self.active = callback, args, True

    def stop(self):
        self.active = False

    def close(self):
        self.closed = True


def run_iteration(queue):
    """The end of a loop iteration: the queue's check watcher runs."""
    check = queue._check
    check.callback(*check.args)


class FakeLoop:
    def __init__(self):
        self.watchers = []

    def io(self, fd, events):
        watcher = FakeWatcher(fd, events)
        self.watchers.append(watcher)
        return watcher

    def check(self, ref=True):
        return FakeWatcher()

    def idle(self, ref=True):
        self.idler = FakeWatcher()
        return self.idler


class Endpoint:
    """A scripted endpoint: ``feed`` what its peer sent (``b""`` for its EOF);
    ``room`` is how many bytes ``send`` may take (None: any)."""

    def __init__(self, fd):
        self.fd = fd
        self.inbox = []
        self.sent = bytearray()
        self.room = None
        self.shut = []
        self.closed = False
        self.error = None

    def feed(self, data):
        self.inbox.append(data)

    def recv_into(self, buf):
        if self.error is not None:
            raise self.error
        if not self.inbox:
            raise BlockingIOError(errno.EAGAIN, "would block")
        data = self.inbox.pop(0)
        n = min(len(data), len(buf))
        buf[:n] = data[:n]
        if n < len(data):
            self.inbox.insert(0, data[n:])
        return n

    def send(self, data):
        n = len(data) if self.room is None else min(self.room, len(data))
        if not n:
            raise BlockingIOError(errno.EAGAIN, "would block")
        if self.room is not None:
            self.room -= n
        self.sent += bytes(data[:n])
        return n

    def shutdown(self, how):
        self.shut.append(how)

    def close(self):
        self.closed = True

    def fileno(self):
        return self.fd


class Harness:
    """One relay on a fake loop, and ways to make its endpoints ready."""

    def __init__(self, mqtt=False):
        self.loop = FakeLoop()
        self.hub = RelayHub(loop=self.loop)
        self.client, self.upstream = Endpoint(10), Endpoint(11)
        self.info = SessionInfo("1-1", "127.0.0.1", 40000, "127.0.0.1", 9100)
        self.done = []
        self.relay = Relay(self.hub, self.client, self.upstream, self.info,
                           self.done.append, 600.0, mqtt)
        self.relay.start()

    def watcher(self, fd, events):
        found = [w for w in self.loop.watchers if (w.fd, w.events) == (fd, events)]
        return found[-1] if found else None

    def fire(self, fd, events=READ):
        """The kernel says ``fd`` is ready: the watcher records, the queue runs it."""
        watcher = self.watcher(fd, events)
        assert watcher is not None and watcher.active, "no active watcher for %s" % fd
        watcher.callback(*watcher.args)
        run_iteration(self.hub.queue)

    def client_sends(self, data):
        self.client.feed(data)
        self.fire(self.client.fd)

    def broker_sends(self, data):
        self.upstream.feed(data)
        self.fire(self.upstream.fd)


@pytest.fixture
def h():
    return Harness()


@pytest.fixture
def m():
    return Harness(mqtt=True)


# -- bytes and counters ------------------------------------------------------------------

def test_bytes_go_both_ways_and_are_counted(h):
    h.client_sends(b"hello")
    h.broker_sends(b"world!")
    h.client_sends(b"again")
    assert bytes(h.upstream.sent) == b"helloagain"
    assert bytes(h.client.sent) == b"world!"
    assert (h.info.bytes_in, h.info.bytes_out) == (10, 6)
    assert h.relay.reason is None and h.relay in h.hub.relays


def test_a_full_peer_holds_the_rest_and_stops_reading(h):
    h.upstream.room = 3
    h.client_sends(b"hello")
    up = h.relay.up
    assert bytes(h.upstream.sent) == b"hel" and up.backlog == b"lo"
    assert h.info.bytes_in == 5  # counted when read
    assert not up.reader.active and up.writer.active  # back-pressure, as nginx
    h.upstream.room = None
    h.fire(h.upstream.fd, WRITE)
    assert bytes(h.upstream.sent) == b"hello" and up.backlog is None
    assert up.reader.active and not up.writer.active
    h.client_sends(b"!")
    assert bytes(h.upstream.sent) == b"hello!"


# -- half-close and the end -----------------------------------------------------------------

def test_client_eof_is_passed_on_and_the_other_way_goes_on(h):
    h.client_sends(b"request")
    h.client_sends(b"")  # the client's FIN
    assert h.upstream.shut == [socket.SHUT_WR] and h.client.shut == []
    assert h.relay.up.done and not h.relay.up.reader.active
    h.broker_sends(b"answer")
    assert bytes(h.client.sent) == b"answer"
    assert h.done == [] and not h.client.closed
    h.broker_sends(b"")  # both ways ended: finish, close both, report once
    assert h.done == [h.relay] and h.relay.reason == "eof"
    assert h.client.closed and h.upstream.closed
    assert h.relay not in h.hub.relays
    assert all(w.closed for w in h.loop.watchers)


def test_eof_waits_for_the_backlog_before_the_half_close(h):
    h.upstream.room = 2
    h.client_sends(b"last words")
    h.client.feed(b"")  # the FIN arrives, but reading has stopped (back-pressure)
    assert not h.relay.up.reader.active and h.upstream.shut == []
    h.upstream.room = None
    h.fire(h.upstream.fd, WRITE)
    assert bytes(h.upstream.sent) == b"last words" and h.upstream.shut == []
    h.fire(h.client.fd)  # reading resumed: now the EOF is seen and passed on
    assert h.upstream.shut == [socket.SHUT_WR] and h.relay.up.done


def test_a_reset_aborts_both_ways_once(h):
    h.client.error = ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
    h.fire(h.client.fd)
    assert h.relay.reason == "reset" and h.done == [h.relay]
    assert h.client.closed and h.upstream.closed
    h.relay.abort("later")  # idempotent: no second report, the first reason stays
    assert h.done == [h.relay] and h.relay.reason == "reset"


def test_callbacks_queued_before_an_abort_do_nothing(h):
    h.upstream.feed(b"late")
    watcher = h.watcher(h.upstream.fd, READ)
    watcher.callback(*watcher.args)  # recorded in the queue...
    h.relay.abort("disconnected")  # ...then the session is closed in the same iteration
    run_iteration(h.hub.queue)
    assert bytes(h.client.sent) == b"" and h.info.bytes_out == 0


# -- ending cleanly on MQTT routes ----------------------------------------------------------

BYE_BROKER = packets.disconnect(4)
BYE_CLIENT = b"\xe0\x02\x8b\x00"


def test_end_between_packets_says_goodbye_both_ways_at_once(m):
    m.client_sends(packets.publish("a/b", b"x"))
    m.broker_sends(b"\xd0\x00")  # PINGRESP (3.1.1 §3.13)
    before = (m.info.bytes_in, m.info.bytes_out)
    assert m.relay.end_at_boundary(BYE_BROKER, BYE_CLIENT, 5.0) is True
    assert bytes(m.upstream.sent).endswith(BYE_BROKER)
    assert bytes(m.client.sent).endswith(BYE_CLIENT)
    assert (m.info.bytes_in, m.info.bytes_out) == before  # goodbyes are not client bytes
    assert m.done == [m.relay] and m.relay.reason == "eof"


def test_end_mid_packet_forwards_the_rest_of_it_then_the_goodbye(m):
    publish = packets.publish("t", b"p" * 100)
    m.client_sends(publish[:40])
    assert m.relay.end_at_boundary(BYE_BROKER, None, 5.0) is True
    # the broker's way was between packets: it stops at once (nothing to say to a
    # 3.1.1 client) and the client gets the half-close; the client's way waits
    assert m.relay.down.done and m.client.shut == [socket.SHUT_WR]
    assert m.done == [] and m.relay.up.ending and not m.relay.up.done
    assert m.relay.deadline is not None  # the sweeper aborts it if the packet never ends
    following = packets.publish("t", b"next")
    m.client_sends(publish[40:] + following)  # the rest and a packet that must not go
    assert bytes(m.upstream.sent) == publish + BYE_BROKER
    assert m.info.bytes_in == len(publish)  # the unforwarded packet is not counted
    assert m.done == [m.relay] and m.upstream.closed and m.client.closed


def test_end_waits_for_a_held_backlog(m):
    m.upstream.room = 4
    publish = packets.publish("t", b"held")
    m.client_sends(publish)
    m.relay.end_at_boundary(BYE_BROKER, None, 5.0)
    assert bytes(m.upstream.sent) == publish[:4]
    m.upstream.room = None
    m.fire(m.upstream.fd, WRITE)
    assert bytes(m.upstream.sent) == publish + BYE_BROKER


def test_end_without_boundaries_aborts(h):
    # not an MQTT route: nowhere safe to cut, so the session is closed at once
    h.client_sends(b"raw")
    assert h.relay.end_at_boundary(BYE_BROKER, None, 5.0) is False
    assert h.relay.reason == "shutdown" and h.done == [h.relay]


def test_end_after_the_stream_stopped_looking_like_mqtt_aborts(m):
    m.client_sends(b"\x30\xff\xff\xff\xff\x01")  # a fifth length byte: not MQTT
    assert m.relay.up.track.lost
    assert m.relay.end_at_boundary(BYE_BROKER, None, 5.0) is False
    assert m.relay.reason == "shutdown"


# -- the idle sweeper ---------------------------------------------------------------------

def started(hub, n=1, idle=10.0, mqtt=False):
    """``n`` relays started through ``hub``; the test runs ``hub.sweep`` itself."""
    done = []
    relays = [hub.start(Endpoint(100 + 2 * i), Endpoint(101 + 2 * i),
                        SessionInfo("1-%d" % i, "127.0.0.1", 40000, "127.0.0.1", 9100),
                        done.append, idle, mqtt) for i in range(n)]
    hub._sweeper.kill()  # the real one would sweep at the real time
    return relays, done


@pytest.fixture
def hub():
    hub = RelayHub(loop=FakeLoop())
    yield hub
    hub.close_all()


def test_the_sweeper_ends_a_silent_relay_and_spares_one_that_moved_bytes(hub):
    (silent, busy), done = started(hub, 2, idle=10.0)
    t0 = max(silent.last, busy.last)
    busy.last = t0 + 8  # bytes moved 8 s in
    hub.sweep(t0 + 10.5)
    assert done == [silent] and silent.reason == "idle"
    hub.sweep(t0 + 17.5)
    assert done == [silent]  # still 0.5 s to go
    hub.sweep(t0 + 18.5)
    assert done == [silent, busy] and busy.reason == "idle"
    assert not hub.slots  # nothing held for relays that ended


def test_a_round_looks_only_at_the_relays_that_may_be_due(hub, monkeypatch):
    relays, done = started(hub, 1000, idle=100.0)
    looked = []
    due = Relay.due
    monkeypatch.setattr(Relay, "due", lambda r: looked.append(r) or due(r))
    t0 = max(r.last for r in relays)
    for second in range(1, 99):  # 98 rounds: no relay can be due, none is looked at
        hub.sweep(t0 + second)
    assert looked == [] and done == []
    for r in relays[:10]:
        r.last = t0 + 50  # these moved bytes: looked at once more, then put back
    hub.sweep(t0 + 101)
    assert len(looked) == 1000 and len(done) == 990
    hub.sweep(t0 + 140)
    assert len(looked) == 1000  # the ten wait in the slot of t0 + 150
    hub.sweep(t0 + 151)
    assert len(looked) == 1010 and len(done) == 1000


def test_a_clean_end_that_runs_out_of_grace_is_aborted_before_its_idle_time():
    hub = RelayHub(loop=FakeLoop(), sweep_interval=0.05)
    (relay,), done = started(hub, idle=600.0, mqtt=True)
    relay.client.feed(packets.publish("t", b"p" * 100)[:40])  # a packet that never ends
    reader = relay.up.reader
    reader.callback(*reader.args)
    run_iteration(hub.queue)
    assert relay.info.bytes_in == 40
    relay.end_at_boundary(BYE_BROKER, None, 0.2)
    now = relay.deadline - 0.2
    hub.sweep(now + 0.1)
    assert done == []
    hub.sweep(now + 0.31)
    assert done == [relay] and relay.reason == "end timed out"
    hub.close_all()


def test_close_all_ends_every_live_relay_wherever_it_waits(hub):
    relays, done = started(hub, 3, idle=10.0)
    relays[0].last += 30  # moved bytes: the next round puts it in a later slot
    hub.sweep(max(r.last for r in relays[1:]) + 10.5)
    assert set(done) == set(relays[1:])  # in a round, in no particular order
    hub.close_all("shutdown")
    assert len(done) == 3 and done[2] is relays[0] and relays[0].reason == "shutdown"
    assert hub.relays == set()


def test_a_slot_holds_its_live_relays_and_nothing_of_those_that_ended(hub, monkeypatch):
    import types

    from gproxy.proxy.relay import relay as relay_module
    # all start in the same second, whatever the machine's speed: one slot
    now = float(int(relay_module.time.monotonic()) + 2)
    monkeypatch.setattr(relay_module, "time", types.SimpleNamespace(monotonic=lambda: now))
    relays, done = started(hub, 5000, idle=100.0)
    assert len({r.slot for r in relays}) == 1 and len(hub.slots) == 1
    assert len({id(r.slot) for r in relays}) == 1  # one int object for the slot, not 5,000
    for r in relays[10:-3]:  # under churn most sessions end long before their idle time
        r.abort("eof")
    for r in relays[:10]:  # first, last, middle: any may end
        r.abort("eof")
    assert hub.relays == set(relays[-3:]) and len(done) == 4997
    assert all(r.slot is None and r.slot_prev is None and r.slot_next is None
               for r in relays[:-3])  # unlinked: an ended relay holds no live one
    for r in relays[-3:]:
        r.abort("eof")
    assert not hub.slots and hub.relays == set()


# -- the event queue's slices -------------------------------------------------------------

class Owner:
    """Records the event queue runs, parks and unparks (a relay's directions are such)."""

    def __init__(self):
        self.ran, self.parked, self.unparked = [], [], []

    def record(self, n):
        return Record(self, n)


class Record:
    def __init__(self, owner, n):
        self.owner, self.n = owner, n

    def ready(self):
        self.owner.ran.append(self.n)

    def park(self):
        self.owner.parked.append(self.n)

    def unpark(self):
        self.owner.unparked.append(self.n)


def test_a_burst_runs_in_slices_in_order_and_parks_what_waits():
    loop = FakeLoop()
    queue = EventQueue(loop)
    owner = Owner()
    burst = list(range(BATCH * 2 + 44))
    for n in burst:  # one iteration reports them all (FakeLoop: in order)
        queue.append(owner.record(n))
    run_iteration(queue)
    assert owner.ran == burst[:BATCH] and loop.idler.active  # the loop must not block
    assert sorted(owner.parked) == burst[BATCH:]  # their watchers stop: no re-reports
    queue.append(owner.record("new"))  # the next iteration reports one more socket
    run_iteration(queue)
    assert owner.ran == burst[:BATCH * 2]  # the waiting ones first
    assert owner.unparked == burst[BATCH:BATCH * 2]
    run_iteration(queue)
    assert owner.ran == burst + ["new"] and owner.unparked == burst[BATCH:] + ["new"]
    assert len(owner.parked) == len(burst) - BATCH + 1 and "new" in owner.parked
    assert not loop.idler.active
    run_iteration(queue)
    assert len(owner.ran) == len(burst) + 1


def test_a_parked_reader_starts_again_only_if_still_wanted(h):
    up = h.relay.up
    up.park()
    assert not up.reader.active
    h.client.feed(b"data")
    up.ready()  # the parked record runs
    up.unpark()
    assert bytes(h.upstream.sent) == b"data" and up.reader.active
    h.upstream.room = 0
    up.park()
    h.client.feed(b"more")
    up.ready()  # the broker is full: held, the reader must stay stopped
    up.unpark()
    assert up.backlog == b"more" and not up.reader.active and up.writer.active


def test_a_record_from_before_a_hold_does_not_jump_the_backlog(h):
    h.upstream.room = 4
    h.client_sends(b"first")
    assert bytes(h.upstream.sent) == b"firs" and h.relay.up.backlog == b"t"
    h.client.feed(b"second")
    h.relay._readable(h.relay.up)  # a record queued before the reader stopped
    assert bytes(h.upstream.sent) == b"firs"
    h.upstream.room = None
    h.fire(h.upstream.fd, WRITE)
    h.fire(h.client.fd)
    assert bytes(h.upstream.sent) == b"firstsecond"


def test_bytes_buffered_in_the_endpoint_go_on_after_a_backlog_drains():
    class Buffered(Endpoint):  # a TLS endpoint: decrypted bytes wait in the endpoint
        def pending(self):
            return bool(self.inbox)

    loop = FakeLoop()
    hub = RelayHub(loop=loop)
    client, upstream = Buffered(10), Endpoint(11)
    relay = Relay(hub, client, upstream, SessionInfo("1-1", "127.0.0.1", 1, "127.0.0.1", 2),
                  [].append, 600.0)
    relay.start()
    upstream.room = 3
    for chunk in (b"abc", b"def", b"ghi"):  # one TLS read brought all three
        client.feed(chunk)

    def fire(fd, events):
        watcher = [w for w in loop.watchers if (w.fd, w.events) == (fd, events)][-1]
        watcher.callback(*watcher.args)
        run_iteration(hub.queue)

    fire(10, READ)  # "abc" goes, "def" is held, "ghi" stays in the endpoint
    assert bytes(upstream.sent) == b"abc" and relay.up.backlog == b"def"
    upstream.room = None
    fire(11, WRITE)  # the socket will not report "ghi": the relay must look itself
    assert bytes(upstream.sent) == b"abcdefghi"


def test_a_failing_callback_costs_only_its_own_relay():
    queue = EventQueue(FakeLoop())
    owner = Owner()

    class Failing:
        failed = False

        def ready(self):
            raise RuntimeError("bug")

        def fail(self):
            self.failed = True

    failing = Failing()
    for record in (owner.record(1), failing, owner.record(2)):
        queue.append(record)
    run_iteration(queue)
    assert owner.ran == [1, 2] and failing.failed


def test_a_bug_in_a_relay_aborts_that_relay(h):
    def broken(buf):
        raise RuntimeError("bug")

    h.client.recv_into = broken
    h.client.feed(b"x")
    h.fire(h.client.fd)
    assert h.relay.reason == "error: internal" and h.done == [h.relay]
    assert h.client.closed and h.upstream.closed
