"""The handover's wire: length-prefixed JSON messages with descriptors, over Unix sockets.

Each message is a 4-byte big-endian length and a JSON object; the
descriptors that go with it travel in the same ``sendmsg`` (SCM_RIGHTS) and
the object says how many (``"fds": n``).  ``connect``/``listen`` open the
Unix socket paths the handovers between workers and embedded proxies use
(``runtime.transfer``).  Every failure is a ``HandoverError`` whose message
the caller logs.
"""

import json
import os
import socket
import struct

import gevent
import gevent.socket

from gproxy.errors import HandoverError  # noqa: F401 (its home is errors: the host raises it)
from gproxy.proxy.relay import handoff

MAX_FDS = 253  # SCM_MAX_FD: descriptors one message can carry
STEP_TIMEOUT = 30.0  # seconds the other end may take for one step
_LEN = struct.Struct("!I")


class Wire:
    """Length-prefixed JSON messages with descriptors, over a (gevent) Unix socket."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()
        self.fds = []

    def send(self, message, fds=()):
        data = json.dumps(dict(message, fds=len(fds)), separators=(",", ":")).encode()
        frame = _LEN.pack(len(data)) + data
        try:
            sent = socket.send_fds(self.sock, [frame], list(fds)) if fds else 0
            self.sock.sendall(frame[sent:])
        except OSError as exc:
            raise HandoverError("the other process went away (%s)" % exc) from None

    def recv(self, timeout=STEP_TIMEOUT, expect=None):
        """The next message and its descriptors; HandoverError at EOF or timeout."""
        try:
            with gevent.Timeout(timeout):
                while True:
                    if len(self.buf) >= 4:
                        size = _LEN.unpack_from(self.buf)[0]
                        if len(self.buf) >= 4 + size:
                            return self._message(size, expect)
                    data, fds, flags, _ = socket.recv_fds(self.sock, 1 << 18, MAX_FDS)
                    self.fds.extend(fds)
                    if flags & socket.MSG_CTRUNC:
                        raise HandoverError("descriptors were lost in transit (MSG_CTRUNC)")
                    if not data:
                        raise HandoverError("the other process went away")
                    self.buf += data
        except gevent.Timeout:
            raise HandoverError("no answer within %.0fs" % timeout) from None
        except OSError as exc:
            raise HandoverError("the other process went away (%s)" % exc) from None

    def _message(self, size, expect):
        message = json.loads(bytes(self.buf[4:4 + size]))
        del self.buf[:4 + size]
        n = message.get("fds", 0)
        fds, self.fds = self.fds[:n], self.fds[n:]
        if expect is not None and message.get("op") != expect:
            handoff.close_fds(fds)
            raise HandoverError("expected %r, got %r" % (expect, message.get("op")))
        return message, fds

    def close(self):
        handoff.close_fds(self.fds)
        self.fds = []
        self.sock.close()


def connect(path, what):
    """A connected (gevent) Unix socket to ``path``; HandoverError naming ``what``."""
    sock = gevent.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise HandoverError("cannot reach %s at %s: %s" % (what, path, exc.strerror)) from None
    return Wire(sock)


def listen(path, backlog=1):
    """A listening (gevent) Unix socket at ``path``, readable by this user only."""
    server = gevent.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o077)
    try:
        server.bind(path)
    finally:
        os.umask(old)
    server.listen(backlog)
    return server
