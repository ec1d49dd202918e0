"""The relay: pump bytes both ways between two connected sockets until both end.

Nothing here knows MQTT.  Each direction copies with ``recv_into`` into its
own buffer and ``sendall``; end of stream on one side is passed on as a
half-close (``shutdown(SHUT_WR)``) and the other direction keeps flowing until
it ends too (inetaf/tcpproxy's model).  An error on either side aborts both.
Byte counts go onto the session record as they move.  The caller owns and
closes the sockets.
"""

import errno
import socket
import time

import gevent

BUFFER_SIZE = 64 * 1024


class _Pair:
    """The shared state of one relay: last activity and the abort switch."""

    def __init__(self, client, upstream, idle_timeout):
        self.client = client
        self.upstream = upstream
        self.idle_timeout = idle_timeout
        self.last = time.monotonic()
        self.aborted = None

    def abort(self, reason):
        if self.aborted is None:
            self.aborted = reason
        for sock in (self.client, self.upstream):
            shutdown(sock, socket.SHUT_RDWR)


def shutdown(sock, how):
    try:
        sock.shutdown(how)
    except OSError:
        pass  # already closed or reset: nothing left to tell the peer


def _pump(pair, src, dst, info, counter):
    buf = bytearray(BUFFER_SIZE)
    view = memoryview(buf)
    # A quiet direction wakes every idle_timeout and checks the shared clock, so
    # a session idles out within 1-2 x idle_timeout of its last byte either way.
    src.settimeout(pair.idle_timeout)
    while pair.aborted is None:
        try:
            n = src.recv_into(buf)
        except socket.timeout:
            if time.monotonic() - pair.last >= pair.idle_timeout:
                pair.abort("idle")
            continue
        except OSError as exc:
            pair.abort(_reason(exc))
            return
        if not n:
            shutdown(dst, socket.SHUT_WR)  # pass the half-close on
            return
        pair.last = time.monotonic()
        try:
            dst.sendall(view[:n])
        except OSError as exc:
            pair.abort(_reason(exc))
            return
        setattr(info, counter, getattr(info, counter) + n)


def _reason(exc):
    if exc.errno in (errno.ECONNRESET, errno.EPIPE):
        return "reset"
    return "error: %s" % (exc.strerror or exc)


def relay(client, upstream, info, idle_timeout=600.0):
    """Relay until both directions have ended; return None or why it was cut short.

    ``info.bytes_in`` counts client->upstream bytes, ``info.bytes_out`` the
    other way.  The client->upstream pump runs in a second greenlet; this one
    runs upstream->client.
    """
    pair = _Pair(client, upstream, idle_timeout)
    up = gevent.spawn(_pump, pair, client, upstream, info, "bytes_in")
    try:
        _pump(pair, upstream, client, info, "bytes_out")
        up.join()
    finally:
        if not up.dead:
            pair.abort("cancelled")
            up.kill(block=True)
    return pair.aborted
