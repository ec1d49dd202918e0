"""The workers' control channel (gproxy.runtime.channel, workers.serve_control).

In-process: the parent's ``Channel`` and the worker's ``serve_control`` loop
(or a scripted worker) run as greenlets on the two ends of a Unix socketpair;
nothing is forked and no network is used.  What is checked: every reply
carries its request's id; a reply that comes after its caller timed out is
dropped and the next call gets its own; a malformed line (or a message cut
short) is logged and dropped and the worker loop goes on; a failing or
unknown request gets an error reply instead of killing the worker.
"""

import json
import logging

import gevent
import gevent.socket
import pytest

from gproxy.proxy.sessions.registry import Registry
from gproxy.runtime.channel import Channel, LineReader, decode, encode
from gproxy.runtime.workers import serve_control


@pytest.fixture
def pair():
    parent, worker = gevent.socket.socketpair()
    yield parent, worker
    parent.close()
    worker.close()


class FakeTables:
    """A worker's Tables: what it was asked to apply."""

    def __init__(self):
        self.applied = []

    def apply(self, changes):
        if changes == "boom":
            raise ValueError("bad table")
        self.applied.append(changes)


class FakeApp:
    """What serve_control asks of the worker's Gproxy: its tables and a registry."""

    def __init__(self):
        self.registry = Registry(worker=3)
        self.tables = FakeTables()


@pytest.fixture
def worker(pair):
    """A real worker loop on the worker end; yields (channel, app, the loop's greenlet)."""
    parent, child = pair
    app = FakeApp()
    loop = gevent.spawn(serve_control, app, child)
    yield Channel(4242, parent), app, loop
    loop.kill()


def lines_from(sock):
    reader = LineReader(sock)
    while True:
        line = reader.readline()
        if not line:
            return
        yield json.loads(line)


# -- ids ---------------------------------------------------------------------------------

def test_every_reply_carries_its_request_id(worker):
    channel, app, _ = worker
    first = channel.call({"op": "changes", "changes": [["upstreams", "1", None]]})
    second = channel.call({"op": "stats"})
    assert first == {"ok": True, "id": 1}
    assert second["id"] == 2 and second["live_sessions"] == 0
    assert app.tables.applied == [[["upstreams", "1", None]]]


def test_a_late_reply_is_dropped_and_the_next_call_gets_its_own(pair, caplog):
    parent, child = pair
    channel = Channel(4242, parent)
    requests = lines_from(child)
    slow_done = gevent.event.Event()

    def scripted_worker():
        first = next(requests)  # answered only after the caller gave up
        slow_done.wait(5)
        child.sendall(encode({"id": first["id"], "answer": "to the first"}))
        second = next(requests)
        child.sendall(encode({"id": second["id"], "answer": "to the second"}))

    g = gevent.spawn(scripted_worker)
    with pytest.raises(gevent.Timeout):
        channel.call({"op": "stats"}, timeout=0.05)
    slow_done.set()
    with caplog.at_level(logging.INFO, logger="gproxy.workers"):
        reply = channel.call({"op": "stats"}, timeout=5)
    g.join(5)
    assert reply == {"id": 2, "answer": "to the second"}
    assert "worker 4242: dropped a late reply to request 1" in caplog.text


# -- malformed messages ---------------------------------------------------------------------

@pytest.mark.parametrize("junk", [b"not json\n", b"[1, 2]\n", b'{"op": "sta', b"\x00\xff\n"])
def test_a_malformed_line_is_logged_and_dropped_and_the_loop_goes_on(worker, caplog, junk):
    channel, _, loop = worker
    with caplog.at_level(logging.ERROR, logger="gproxy.workers"):
        channel.sock.sendall(junk)  # a message cut short is resynchronised by the next one
        reply = channel.call({"op": "sessions"})
    assert reply == {"list": [], "id": 1}
    assert not loop.dead
    assert "control channel: dropped a malformed message (%d bytes)" % len(
        junk.strip(b"\n")) in caplog.text


def test_a_failing_request_gets_an_error_reply_and_the_loop_goes_on(worker, caplog):
    channel, app, loop = worker
    with caplog.at_level(logging.ERROR, logger="gproxy.workers"):
        failed = channel.call({"op": "changes", "changes": "boom"})
        unknown = channel.call({"op": "reboot"})
        missing = channel.call({"op": "close"})  # no "sid": a KeyError in the handler
        fine = channel.call({"op": "close", "sid": "3-1"})
    assert failed == {"error": "bad table", "id": 1}
    assert unknown == {"error": "unknown op", "id": 2}
    assert missing["id"] == 3 and "error" in missing
    assert fine == {"closed": False, "id": 4}
    assert not loop.dead
    assert "dropped a control message with unknown op 'reboot'" in caplog.text


# -- the end of the loop ----------------------------------------------------------------------

def test_stop_is_acknowledged_and_returns_the_grace_period(worker):
    channel, _, loop = worker
    assert channel.call({"op": "stop", "timeout": 2.5}) == {"id": 1, "ok": True}
    assert loop.get(timeout=5) == 2.5


def test_the_parent_going_away_stops_the_loop(worker):
    channel, _, loop = worker
    channel.close()
    assert loop.get(timeout=5) == 0.0


def test_a_closed_worker_is_an_error_for_the_caller(pair):
    parent, child = pair

    def dies_after_reading():
        next(lines_from(child))
        child.close()

    gevent.spawn(dies_after_reading)
    with pytest.raises(OSError, match="^worker 4242 closed its control channel$"):
        Channel(4242, parent).call({"op": "stats"})


# -- framing -----------------------------------------------------------------------------------

def test_messages_start_on_a_fresh_line():
    assert encode({"a": 1}) == b'\n{"a":1}\n'
    assert decode(b'{"a": 1}') == {"a": 1}
    assert decode(b"[]") is None


def test_the_reader_keeps_bytes_across_reads(pair):
    parent, child = pair
    reader = LineReader(child)
    message = encode({"op": "x", "id": 7})
    for i in range(len(message)):  # byte by byte
        parent.sendall(message[i:i + 1])
        gevent.sleep(0)
    assert decode(reader.readline()) == {"op": "x", "id": 7}


class CountingBuffer(bytearray):
    """A reader's buffer that counts the bytes its newline searches look at."""

    scanned = 0

    def find(self, sub, start=0, *rest):
        CountingBuffer.scanned += len(self) - start
        return bytearray.find(self, sub, start, *rest)


class Chunks:
    """A socket whose recv hands out ``data`` 64 KiB at a time."""

    def __init__(self, data):
        self.data, self.pos = data, 0

    def recv(self, n):
        chunk = self.data[self.pos:self.pos + min(n, 65536)]
        self.pos += len(chunk)
        return chunk


def test_a_long_line_is_scanned_once():
    """A 16 MiB message in 64 KiB chunks: each byte is searched for the newline
    once (a rescan of the whole buffer per chunk looked at 2 GiB)."""
    line = b'{"op":"changes","changes":"' + b"x" * (16 << 20) + b'"}'
    reader = LineReader(Chunks(b"\n" + line + b"\n" + encode({"op": "stats"})))
    reader.buf = CountingBuffer()
    CountingBuffer.scanned = 0
    assert reader.readline() == line
    assert decode(reader.readline()) == {"op": "stats"}
    assert CountingBuffer.scanned < 2 * len(line)
