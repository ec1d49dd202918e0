"""The clients of scripts/upgrade_bench.py: N MQTT sessions pinging in one selector loop.

Each session sends a PINGREQ every ``period`` seconds (staggered over the
fleet; never a second one before the first is answered) and times its
PINGRESP, so a session frozen for a while shows it as one long round trip.
A session the proxy closes can reconnect at once and keep retrying every
``retry`` seconds (what a plain restart makes every device do); the loop
records when each was closed and when its CONNACK came back.  Plain,
unpatched Python: this runs beside gproxy, not in it.
"""

import heapq
import selectors
import socket
import time

from scale_setup import HOST, mqttwire, open_idle

PINGREQ, PINGRESP = b"\xc0\x00", b"\xd0\x00"


class Session:
    __slots__ = ("index", "sock", "buf", "sent", "next", "closed", "back", "up")

    def __init__(self, index, sock):
        self.index = index
        self.sock = sock
        self.buf = b""
        self.sent = None  # when the outstanding PINGREQ went out
        self.next = 0.0
        self.closed = None  # when the proxy closed it (a plain restart)
        self.back = None  # when its CONNACK came back after that
        self.up = True


class Fleet:
    def __init__(self, port, count, prefix=b"upg-"):
        self.port = port
        self.template = mqttwire.ConnectTemplate(prefix, 0)
        self.sel = selectors.DefaultSelector()
        self.sessions = []
        for i, sock in enumerate(open_idle(port, count, prefix=prefix)):
            self._add(Session(i, sock))
        self.pings = []  # (index, sent, rtt)
        self.due = []  # (when, index): the next ping or reconnect of each session

    def _add(self, s):
        s.sock.setblocking(False)
        self.sel.register(s.sock, selectors.EVENT_READ, s)
        if s.index >= len(self.sessions):
            self.sessions.append(s)

    def run(self, seconds, period, reconnect=False, retry=0.1, until=None):
        """Ping for ``seconds`` (or until ``until()`` is true, at most ``seconds``).

        Due sessions come off a heap, so the loop costs the bench a few
        microseconds a ping, not a walk over the fleet every few milliseconds
        (the bench shares the machine with the processes it measures)."""
        start = time.monotonic()
        n = len(self.sessions)
        self.due = []
        for s in self.sessions:
            s.next = start + period * s.index / n
            self.due.append((s.next, s.index))
        heapq.heapify(self.due)
        end = start + seconds
        while time.monotonic() < end and not (until and until()):
            now = time.monotonic()
            while self.due and self.due[0][0] <= now:
                _, i = heapq.heappop(self.due)
                s = self.sessions[i]
                if s.up and s.sent is None:
                    self._ping(s, now)
                elif not s.up and reconnect:
                    self._reconnect(s, now, retry)
            for key, _ in self.sel.select(0.002):
                self._readable(key.data, period)

    def _later(self, s, when):
        s.next = when
        heapq.heappush(self.due, (when, s.index))

    def _ping(self, s, now):
        try:
            s.sock.send(PINGREQ)
            s.sent = now
        except OSError:
            self._lost(s, now)

    def _readable(self, s, period):
        try:
            data = s.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        now = time.monotonic()
        if not data:
            return self._lost(s, now)
        s.buf += data
        if not s.up:  # waiting for the CONNACK of a reconnect
            if len(s.buf) >= 4:
                s.buf, s.up, s.back = s.buf[4:], True, now
                self._later(s, now + period)
            return
        while s.buf.startswith(PINGRESP):
            s.buf = s.buf[2:]
            if s.sent is not None:
                self.pings.append((s.index, s.sent, now - s.sent))
                s.sent = None
                self._later(s, now + period)
        if s.buf.startswith(b"\xe0"):  # a DISCONNECT from the proxy: it will close
            s.buf = b""

    def _lost(self, s, now):
        try:
            self.sel.unregister(s.sock)
        except (KeyError, ValueError):
            pass
        s.sock.close()
        if s.up or s.closed is None:
            s.closed = s.closed or now
        s.up, s.sent, s.buf = False, None, b""
        self._later(s, now)

    def _reconnect(self, s, now, retry):
        try:
            sock = socket.create_connection((HOST, self.port), timeout=1)
            sock.sendall(self.template.build(s.index))
        except OSError:
            self._later(s, now + retry)
            return
        s.sock = sock
        self._add(s)

    @property
    def all_up(self):
        return all(s.up for s in self.sessions)

    def close(self):
        for s in self.sessions:
            try:
                s.sock.close()
            except OSError:
                pass
        self.sel.close()


def pauses(pings, since, until):
    """Each session's longest round trip among the pings sent in ``[since, until]``."""
    worst = {}
    for index, sent, rtt in pings:
        if since <= sent <= until and rtt > worst.get(index, 0.0):
            worst[index] = rtt
    return sorted(worst.values())
