"""One way of a relay: its endpoints, watchers, backlog, pipe and packet boundaries.

Also the relay's small shared helpers: ``shutdown`` (never raises) and the
short reason a socket error ends a relay with.  splice(2) is offered only
between two kernel sockets (never for TLS or WebSocket endpoints).

**The state of a direction at rest** (between two callbacks; what a live
upgrade must carry to another process, everything else is rebuilt there):

* ``backlog``: bytes read from src and not yet written to dst: None, a
  ``bytes``, or an int: that many bytes wait in ``pipe`` (read them out of
  ``pipe[0]`` to carry them);
* ``track`` (``protocols.mqttstream.Boundaries``, None on a non-MQTT
  route): ``left``, ``header``, ``lost``, ``packets``, counted up to the last
  byte taken from src (the backlog's bytes included);
* ``done``, ``ending``, ``bye``: the end of the stream, a clean end asked
  for, and the goodbye still to send;
* ``splicing``: how bytes move now (``COPY``, ``BODY``, ``WALK``, ``ALL``);
  a new process may start again from ``COPY`` once the backlog is out.

Nothing else lasts: ``walk`` peeks at headers afresh on every call (the
socket's ``SO_PEEK_OFF`` is set before each peek, never relied on after).
"""

import _socket
import errno
import fcntl
import os
import socket

from gproxy.protocols.mqttstream import Boundaries
from gproxy.protocols.mqttwalk import walk_headers

READ, WRITE = 1, 2
SPLICE = hasattr(os, "splice")
PIPE_SIZE = 1024 * 1024
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
#: A kernel socket as the relay holds it (not a TLS or WebSocket wrapper).
RawEndpoint = _socket.socket
#: How a direction moves bytes (``Direction.splicing``): through Python's
#: buffer; the rest of one large MQTT body through the pipe; whole runs of
#: large MQTT packets through the pipe, their headers found by peeking; or
#: everything through the pipe (no packet boundaries to keep).
COPY, BODY, WALK, ALL = 0, 1, 2, 3
MODES = ("copy", "body", "walk", "all")  # their names (logs, the handed state)
_SO_PEEK_OFF = getattr(socket, "SO_PEEK_OFF", 42)  # 42 on Linux (asm-generic/socket.h)
_PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT
_SOL = socket.SOL_SOCKET
_HEADER_PEEK = 8  # a fixed header is at most 5 bytes; a few more catch tiny packets after it
_NO_PEEK_OFF = (errno.EOPNOTSUPP, errno.ENOPROTOOPT, errno.EINVAL)
SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)


def _peek_offset_works():
    """True if this kernel lets TCP peek at an offset (SO_PEEK_OFF, Linux 6.10+)."""
    if not SPLICE:
        return False
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, _SO_PEEK_OFF, 0)
    except OSError:
        return False
    return True


#: Large MQTT packets can be walked (``WALK``); without it only bodies of
#: ``splicing.SPLICE_BODY`` or more are spliced (``BODY``).
PEEK_WALK = _peek_offset_works()


def shutdown(sock, how):
    try:
        sock.shutdown(how)
    except OSError:
        pass  # already closed or reset: nothing left to tell the peer


def reason_of(exc):
    if exc.errno in (errno.ECONNRESET, errno.EPIPE):
        return "reset"
    return "error: %s" % (exc.strerror or exc)


class Direction:
    """One way of a relay: src -> dst, with its watchers, backlog and boundaries.

    It is also its watchers' callback (called with no argument, so a watcher
    holds no argument tuple: 48 bytes a direction at tens of thousands of
    idle sessions), which records it in the event queue (``events``); the
    queue calls ``ready()`` once the socket it waits on is ready, which moves
    bytes the way the state says: out of the backlog while there is one, in
    from src otherwise (the watcher that fired is then the one for that
    state; a record from before a change finds the state, not the old
    intent, and so never reads ahead of a backlog).
    """

    __slots__ = ("relay", "src", "dst", "reader", "writer", "backlog", "done", "pipe", "splicing",
                 "track", "ending", "bye", "pending", "walkable")

    def __init__(self, relay, loop, src, dst, track):
        self.relay = relay  # (a cycle until close(): the relay holds its directions)
        self.src = src
        self.dst = dst
        self.reader = loop.io(src.fileno(), READ)
        self.writer = None  # created when dst first pushes back
        self.backlog = None  # bytes dst has not taken yet (an int: bytes in the pipe)
        self.done = False  # src ended (or this direction was ended cleanly)
        self.pipe = None  # (read fd, write fd) once this direction splices
        self.splicing = COPY
        self.walkable = PEEK_WALK  # False once src refuses SO_PEEK_OFF (then: COPY)
        self.track = Boundaries() if track else None
        self.ending = False  # stop at the next packet boundary
        self.bye = None  # bytes to send dst at that boundary (a DISCONNECT)
        self.pending = getattr(src, "pending", None)  # TLS: bytes already decrypted

    def splice_ok(self):
        """splice(2) needs kernel sockets on both sides (not TLS or WebSocket endpoints)."""
        return SPLICE and type(self.src) is RawEndpoint and type(self.dst) is RawEndpoint

    # -- what the watchers and the event queue call ----------------------------
    def __call__(self):
        self.relay.hub.queue.append(self)  # a watcher fired: record, run later in order

    def ready(self):
        relay = self.relay
        if relay is None:
            return  # recorded before its relay finished
        if self.backlog is None:
            relay._readable(self)
        else:
            relay._writable(self)

    def park(self):
        """A record of this direction waits for a later iteration: stop its watcher."""
        relay = self.relay
        if relay is not None and relay.reason is None:
            watcher = self.reader if self.backlog is None else self.writer
            watcher.stop()

    def unpark(self):
        """The parked record has run: start the watcher the state wants again."""
        relay = self.relay
        if relay is None or relay.reason is not None:
            return
        if self.backlog is None:
            if not self.done:
                relay._resume(self)
        else:
            self.writer.start(self)

    def fail(self):
        if self.relay is not None:
            self.relay.abort("error: internal")

    def walk(self, limit, small):
        """Move into the pipe what waits on src, up to ``limit`` bytes of known packets.

        Peeks at each packet's header where the last body ends
        (``mqttwalk.walk_headers``), splices every byte whose structure is
        then known, and brings ``track`` up to where that ended.  Returns the
        bytes moved; 0 at the end of the stream; None when nothing could be
        moved now.  Raises OSError from the socket.
        """
        src = self.src
        setsockopt, recv = src.setsockopt, src.recv
        eof = []  # a peek at offset 0 saw the end of src's stream: nothing left to take

        def peek(offset):
            try:
                setsockopt(_SOL, _SO_PEEK_OFF, offset)
                data = recv(_HEADER_PEEK, _PEEK)
            except BlockingIOError:
                return b""
            except OSError as exc:
                if exc.errno not in _NO_PEEK_OFF:
                    raise
                self.walkable = False  # (a family the probe did not cover): copy from now on
                self.splicing = COPY
                return b""
            if not data and not offset:
                eof.append(True)
            return data

        n, marks = walk_headers(self.track, peek, limit, small)
        if not n:
            return 0 if eof else None
        n = os.splice(src.fileno(), self.pipe[1], n, flags=SPLICE_FLAGS)
        if n:
            self.track.advance(n, marks)
            if len(marks) > 4 and n < small * len(marks):
                self.splicing = COPY  # small packets again: copying them is cheaper
        if self.track.lost:
            self.splicing = ALL
        return n

    def open_pipe(self):
        if self.pipe is not None:
            return True
        try:
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return False  # out of fds: keep copying
        try:
            fcntl.fcntl(w, _F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # the default 64 KiB pipe still works
        self.pipe = (r, w)
        return True

    # -- handover to another process (relay.handoff packs these) ---------------
    def export(self):
        """This direction's state at rest (the relay quiesced): ``backlog`` (bytes;
        those waiting in the pipe read out of it), ``done``, the tracker, and
        ``mode``/``piped``, what it was doing (for the record: a resumed
        direction starts again from COPY and decides anew on its next read).
        The pipe is empty and the mode COPY afterwards, so a ``restart`` here
        sends the backlog as bytes too."""
        backlog, piped, mode = self.backlog, 0, self.splicing
        if backlog.__class__ is int:  # bytes spliced into the pipe, not written yet
            piped = backlog
            backlog = self.read_pipe(backlog)
        self.backlog = backlog
        self.splicing = COPY
        if mode == WALK or self.pipe is not None and self.walkable:
            self.forget_peek_offset()
        return {"backlog": backlog, "done": self.done, "track": self.track,
                "mode": MODES[mode], "piped": piped}

    def forget_peek_offset(self):
        """SO_PEEK_OFF off again (-1): the socket travels with the offset a walk
        left, and a walk sets it before every peek anyway, so none is carried."""
        try:
            self.src.setsockopt(_SOL, _SO_PEEK_OFF, -1)
        except OSError:
            pass

    def restore(self, backlog, done):
        """What ``export`` returned, in a new direction (the tracker is loaded apart)."""
        self.backlog = backlog or None
        self.done = done

    def read_pipe(self, n):
        """The ``n`` bytes waiting in the pipe, as bytes (None if it held none)."""
        chunks = []
        while n > 0:
            chunk = os.read(self.pipe[0], n)
            if not chunk:
                break
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks) or None

    def close(self):
        """Stop and let go of the watchers, the pipe and the relay (it has ended).

        The watchers hold this direction (their argument) and it holds the
        relay: dropping them here leaves no reference cycle, so an ended relay
        is freed by its reference count and never waits for the cyclic
        collector (which the CLI keeps off live sessions: runtime/gcpolicy.py).
        """
        for watcher in (self.reader, self.writer):
            if watcher is not None:
                watcher.close()  # (stops it first)
        self.reader = self.writer = None
        self.relay = None
        self.close_pipe()

    def close_pipe(self):
        if self.pipe is not None:
            os.close(self.pipe[0])
            os.close(self.pipe[1])
            self.pipe = None
