"""The relay: pump bytes both ways between two connected sockets until both end.

Nothing here knows MQTT.  Once a session is connected, its greenlet hands
both file descriptors to a ``Relay`` and returns: from then on the bytes are
moved by libev I/O watcher callbacks on the hub, so an idle session costs two
sockets, two watchers and one small object, not greenlet stacks.

Each direction reads into one shared buffer and writes straight to the other
socket; what the other socket does not take at once is kept as that
direction's backlog, and reading from the source stops until it drains
(back-pressure, as nginx does).  End of stream on one side is passed on as a
half-close (``shutdown(SHUT_WR)``) and the other direction keeps flowing
until it ends too (inetaf/tcpproxy's model).  An error on either side aborts
both.  Byte counts go onto the session record as they move.  Callbacks never
block and never raise into the hub.
"""

import errno
import fcntl
import logging
import os
import socket
import time

import gevent

log = logging.getLogger("gproxy.relay")

BUFFER_SIZE = 64 * 1024
READ, WRITE = 1, 2
_RETRY = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR)
#: A direction that reads this much at once is carrying bulk data: from then on
#: it moves bytes with splice(2) through a pipe, never copying them into Python.
#: Idle and chatty MQTT sessions never get a pipe, so they cost no extra fds.
SPLICE = hasattr(os, "splice")
SPLICE_AFTER = 16 * 1024
PIPE_SIZE = 1024 * 1024
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


def shutdown(sock, how):
    try:
        sock.shutdown(how)
    except OSError:
        pass  # already closed or reset: nothing left to tell the peer


class _Direction:
    """One way of a relay: src -> dst, with its watchers and backlog."""

    __slots__ = ("src", "dst", "reader", "writer", "backlog", "counter", "done", "pipe")

    def __init__(self, loop, src, dst, counter):
        self.src = src
        self.dst = dst
        self.reader = loop.io(src.fileno(), READ)
        self.writer = None  # created when dst first pushes back
        self.backlog = None  # bytes dst has not taken yet (in the pipe, when splicing)
        self.counter = counter
        self.done = False
        self.pipe = None  # (read fd, write fd) once this direction splices

    def start_splicing(self):
        try:
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return  # out of fds: keep copying
        try:
            fcntl.fcntl(w, _F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # the default 64 KiB pipe still works
        self.pipe = (r, w)

    def close_pipe(self):
        if self.pipe is not None:
            os.close(self.pipe[0])
            os.close(self.pipe[1])
            self.pipe = None


class Relay:
    """Bytes between ``client`` and ``upstream`` (non-blocking stdlib sockets)."""

    __slots__ = ("hub", "client", "upstream", "info", "on_done", "last", "idle", "reason",
                 "up", "down")

    def __init__(self, hub, client, upstream, info, on_done, idle):
        self.hub = hub
        self.idle = idle
        self.client = client
        self.upstream = upstream
        self.info = info
        self.on_done = on_done
        self.last = time.monotonic()
        self.reason = None
        self.up = _Direction(hub.loop, client, upstream, "bytes_in")
        self.down = _Direction(hub.loop, upstream, client, "bytes_out")

    def start(self):
        self.hub.relays.add(self)
        self.up.reader.start(self._readable, self.up)
        self.down.reader.start(self._readable, self.down)

    def _readable(self, d):
        if d.pipe is not None:
            return self._spliced(d)
        try:
            n = d.src.recv_into(self.hub.buffer)
        except OSError as exc:
            if exc.errno not in _RETRY:
                self.abort(_reason(exc))
            return
        if not n:
            return self._eof(d)
        self.last = time.monotonic()
        setattr(self.info, d.counter, getattr(self.info, d.counter) + n)
        view = memoryview(self.hub.buffer)[:n]
        try:
            sent = d.dst.send(view)
        except OSError as exc:
            if exc.errno not in _RETRY:
                self.abort(_reason(exc))
                return
            sent = 0
        if sent < n:  # the other side is full: hold the rest, stop reading
            self._hold(d, bytes(view[sent:]))
        if n >= SPLICE_AFTER and SPLICE and d.backlog is None:
            d.start_splicing()

    def _spliced(self, d):
        try:
            n = os.splice(d.src.fileno(), d.pipe[1], PIPE_SIZE, flags=_SPLICE_FLAGS)
        except OSError as exc:
            if exc.errno not in _RETRY:
                self.abort(_reason(exc))
            return
        if not n:
            return self._eof(d)
        self.last = time.monotonic()
        setattr(self.info, d.counter, getattr(self.info, d.counter) + n)
        left = self._drain_pipe(d, n)
        if left:
            self._hold(d, left)

    def _drain_pipe(self, d, n):
        """Move ``n`` bytes from the pipe to dst; return how many are still in the pipe."""
        while n:
            try:
                n -= os.splice(d.pipe[0], d.dst.fileno(), n, flags=_SPLICE_FLAGS)
            except OSError as exc:
                if exc.errno not in _RETRY:
                    self.abort(_reason(exc))
                return 0 if self.reason else n
        return 0

    def _hold(self, d, backlog):
        d.backlog = backlog
        d.reader.stop()
        if d.writer is None:
            d.writer = self.hub.loop.io(d.dst.fileno(), WRITE)
        d.writer.start(self._writable, d)

    def _eof(self, d):
        d.reader.stop()
        d.done = True
        other = self.down if d is self.up else self.up
        if other.done:
            self.finish()  # both ways ended: close() sends the FIN, no shutdown needed
        else:
            shutdown(d.dst, socket.SHUT_WR)  # pass the half-close on

    def _writable(self, d):
        if d.pipe is not None:
            left = self._drain_pipe(d, d.backlog)
        else:
            try:
                sent = d.dst.send(d.backlog)
            except OSError as exc:
                if exc.errno not in _RETRY:
                    self.abort(_reason(exc))
                return
            left = d.backlog[sent:] if sent < len(d.backlog) else None
        if self.reason is not None:
            return
        self.last = time.monotonic()
        d.backlog = left or None
        if d.backlog is None:
            d.writer.stop()
            d.reader.start(self._readable, d)

    def abort(self, reason):
        """End both directions now (error, idle, or an operator's disconnect)."""
        if self.reason is None:
            self.reason = reason
        self.finish()

    def finish(self):
        if self not in self.hub.relays:
            return
        self.hub.relays.discard(self)
        for d in (self.up, self.down):
            d.reader.stop()
            d.reader.close()
            if d.writer is not None:
                d.writer.stop()
                d.writer.close()
            d.close_pipe()
        for sock in (self.client, self.upstream):
            sock.close()
        try:
            self.on_done(self)
        except Exception:  # never raise into the hub
            log.exception("relay: completion callback failed")


def _reason(exc):
    if exc.errno in (errno.ECONNRESET, errno.EPIPE):
        return "reset"
    return "error: %s" % (exc.strerror or exc)


class RelayHub:
    """The relays of one process: the shared read buffer and the idle sweeper."""

    def __init__(self, loop=None, sweep_interval=1.0):
        self.loop = loop or gevent.get_hub().loop
        self.buffer = bytearray(BUFFER_SIZE)
        self.relays = set()
        self.sweep_interval = sweep_interval
        self._sweeper = None

    def start(self, client, upstream, info, on_done, idle_timeout=600.0):
        """Relay between two connected sockets; ``on_done(relay)`` runs once at the end.

        The sockets become the relay's: it closes them.  A relay with no byte
        either way for ``idle_timeout`` seconds is closed (nginx proxy_timeout).
        """
        for sock in (client, upstream):
            sock.setblocking(False)
        relay = Relay(self, client, upstream, info, on_done, idle_timeout)
        relay.start()
        if self._sweeper is None:
            self._sweeper = gevent.spawn(self._sweep)
        return relay

    def _sweep(self):
        while True:
            gevent.sleep(self.sweep_interval)
            now = time.monotonic()
            for relay in [r for r in self.relays if now - r.last >= r.idle]:
                relay.abort("idle")

    def close_all(self, reason="shutdown"):
        for relay in list(self.relays):
            relay.abort(reason)
        if self._sweeper is not None:
            self._sweeper.kill(block=False)
            self._sweeper = None
