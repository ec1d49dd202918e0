"""The relay's bulk paths: bytes moved with splice(2) through a pipe, not through Python.

A non-MQTT direction splices everything once it reads ``SPLICE_AFTER`` at
once.  An MQTT direction that reads packets of ``WALK_PACKET`` bytes or more
*walks* them: it peeks at each fixed header where the last body ends
(``SO_PEEK_OFF``, Linux 6.10+; two small syscalls a packet), and splices
every byte whose packet structure it knows, up to the pipe's size, at once;
the boundaries stay known without a body byte entering Python.  More than a
few small packets in a walk send it back to copying.  On older kernels only
a body with ``SPLICE_BODY`` or more still to come is spliced.  splice(2) is
used only between two kernel sockets (``Direction.splice_ok``).

``Splicing`` is a part of ``Relay`` (relay.py), kept apart by concern: its
methods use the relay's own (``_hold``, ``_eof``, ``_moved``, ``_say_bye``,
``abort``) and hold no state of their own.
"""

import errno
import os

from gproxy.proxy.relay.direction import ALL, BODY, COPY, PIPE_SIZE, SPLICE_FLAGS, WALK, reason_of

_RETRY = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR)
#: A non-MQTT direction that reads this much at once is carrying bulk data:
#: from then on it moves bytes with splice(2) through a pipe.
SPLICE_AFTER = 16 * 1024
#: Without SO_PEEK_OFF, on MQTT routes, a packet body with at least this
#: much still to come is spliced; smaller packets are copied.
SPLICE_BODY = 64 * 1024
#: MQTT packets of this size or more are walked rather than copied (where
#: the kernel can peek at an offset): under it, the two syscalls that find a
#: header cost more than copying the packet (measured: bench/README.md).
WALK_PACKET = 8 * 1024


class Splicing:
    """The splice(2) half of ``Relay``."""

    __slots__ = ()

    def _choose_splicing(self, d, n, track, packets):
        """After a large read: splice from now on, the way the stream allows."""
        if track is None or track.lost:
            if n >= SPLICE_AFTER and d.open_pipe():
                d.splicing = ALL
        elif d.walkable:
            if n >= WALK_PACKET * (packets or 1) and d.open_pipe():
                d.splicing = WALK
        elif track.left >= SPLICE_BODY and d.open_pipe():
            d.splicing = BODY

    def _walked(self, d):
        """WALK: splice every byte whose packets are known (headers peeked), at once."""
        try:
            n = d.walk(PIPE_SIZE, WALK_PACKET)
        except OSError as exc:
            if exc.errno not in _RETRY:
                self.abort(reason_of(exc))
            return
        if n is None:
            return
        if not n:
            return self._eof(d)
        self._moved(d, n)
        left = self._drain_pipe(d, n)
        if left:
            self._hold(d, left)

    def _spliced(self, d):
        if d.splicing == WALK:
            return self._walked(d)
        want = PIPE_SIZE if d.splicing == ALL else min(PIPE_SIZE, d.track.left)
        try:
            n = os.splice(d.src.fileno(), d.pipe[1], want, flags=SPLICE_FLAGS)
        except OSError as exc:
            if exc.errno not in _RETRY:
                self.abort(reason_of(exc))
            return
        if not n:
            return self._eof(d)
        self._moved(d, n)
        if d.splicing == BODY:
            d.track.left -= n
            if not d.track.left:
                d.splicing = COPY  # the body is done: read the next header
        left = self._drain_pipe(d, n)
        if left:
            self._hold(d, left)
        elif d.ending and not d.splicing:
            self._say_bye(d)

    def _drain_pipe(self, d, n):
        """Move ``n`` bytes from the pipe to dst; return how many are still in the pipe."""
        while n:
            try:
                n -= os.splice(d.pipe[0], d.dst.fileno(), n, flags=SPLICE_FLAGS)
            except OSError as exc:
                if exc.errno not in _RETRY:
                    self.abort(reason_of(exc))
                return 0 if self.reason else n
        return 0
