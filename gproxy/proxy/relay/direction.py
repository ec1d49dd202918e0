"""One way of a relay: its endpoints, watchers, backlog, pipe and packet boundaries.

Also the relay's small shared helpers: ``shutdown`` (never raises) and the
short reason a socket error ends a relay with.  splice(2) is offered only
between two kernel sockets (never for TLS or WebSocket endpoints).
"""

import _socket
import ctypes
import errno
import fcntl
import os

from gproxy.protocols.mqttstream import Boundaries

READ, WRITE = 1, 2
SPLICE = hasattr(os, "splice")
PIPE_SIZE = 1024 * 1024
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
#: A kernel socket as the relay holds it (not a TLS or WebSocket wrapper).
RawEndpoint = _socket.socket


def shutdown(sock, how):
    try:
        sock.shutdown(how)
    except OSError:
        pass  # already closed or reset: nothing left to tell the peer


def forget_fd(loop, fd):
    """Take ``fd`` out of the hub's epoll set before closing a descriptor that
    another process still holds (a handed session).

    epoll watches open file descriptions, not descriptor numbers: closing our
    number while the other process keeps the socket open would leave it in
    the set (libev never deletes, it waits for the close), so every byte for
    that session would wake this hub.  A stopped watcher and an explicit
    EPOLL_CTL_DEL on the loop's epoll descriptor fix it.
    """
    if _epoll_ctl is not None and getattr(loop, "backend", None) == "epoll":
        _epoll_ctl(loop.fileno(), _EPOLL_CTL_DEL, fd, None)  # ENOENT: never there


def _libc_epoll_ctl():
    try:
        func = ctypes.CDLL(None, use_errno=True).epoll_ctl
    except (OSError, AttributeError):
        return None  # not Linux: libuv or another libev backend, nothing to undo
    func.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p)
    return func


_EPOLL_CTL_DEL = 2
_epoll_ctl = _libc_epoll_ctl()


def reason_of(exc):
    if exc.errno in (errno.ECONNRESET, errno.EPIPE):
        return "reset"
    return "error: %s" % (exc.strerror or exc)


class Direction:
    """One way of a relay: src -> dst, with its watchers, backlog and boundaries."""

    __slots__ = ("src", "dst", "reader", "writer", "backlog", "counter", "done", "pipe",
                 "splicing", "track", "ending", "bye", "pending", "can_splice")

    def __init__(self, loop, src, dst, counter, track):
        self.src = src
        self.dst = dst
        self.reader = loop.io(src.fileno(), READ)
        self.writer = None  # created when dst first pushes back
        self.backlog = None  # bytes dst has not taken yet (an int: bytes in the pipe)
        self.counter = counter
        self.done = False  # src ended (or this direction was ended cleanly)
        self.pipe = None  # (read fd, write fd) once this direction splices
        self.splicing = False
        self.track = Boundaries() if track else None
        self.ending = False  # stop at the next packet boundary
        self.bye = None  # bytes to send dst at that boundary (a DISCONNECT)
        self.pending = getattr(src, "pending", None)  # TLS: bytes already decrypted
        # splice(2) needs kernel sockets on both sides (not TLS or WebSocket endpoints)
        self.can_splice = SPLICE and type(src) is RawEndpoint and type(dst) is RawEndpoint

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

    # -- handover (relay.handoff packs these for the wire) -------------------
    def export(self):
        """This direction's state, the relay quiesced: backlog bytes, end, tracker."""
        backlog = self.backlog
        if isinstance(backlog, int):  # bytes spliced into the pipe, not written yet
            backlog = self.read_pipe(backlog)
        self.backlog = backlog  # bytes from here on: a restart sends them as such
        self.splicing = False  # the pipe is empty: the next read decides again
        return {"backlog": backlog, "done": self.done, "track": self.track}

    def restore(self, backlog, done):
        self.backlog = backlog or None
        self.done = done

    def read_pipe(self, n):
        chunks = []
        while n > 0:
            chunk = os.read(self.pipe[0], n)
            if not chunk:
                break
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks) or None

    def close_pipe(self):
        if self.pipe is not None:
            os.close(self.pipe[0])
            os.close(self.pipe[1])
            self.pipe = None
