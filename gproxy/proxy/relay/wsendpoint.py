"""The relay's client endpoint for MQTT over WebSocket when gproxy terminates it.

``WebSocketEndpoint`` wraps the client's socket (or any relay endpoint, such
as a TLS one) and offers the relay's endpoint contract (``recv_into``,
``send``, ``fileno``, ``shutdown``, ``close``, ``pending``; "not now" is
``BlockingIOError``), so the relay, its event order, its MQTT boundary
tracking and ``Relay.end_at_boundary`` work unchanged on the MQTT byte stream:

* ``recv_into`` reads frames and returns the MQTT bytes inside the binary
  ones; it answers pings itself, and while a Pong waits for the socket a
  newer Ping replaces it (RFC 6455 §5.5.3 allows answering only the latest),
  so a client that pings and never reads costs one Pong, not one per Ping; a
  Close from the client is echoed (§5.5.1) and ends the stream like a FIN; a
  frame RFC 6455 says to fail on gets a Close with its code and an error the
  relay aborts on.
* ``send`` wraps what the broker sent in one unmasked binary frame (MQTT §6:
  packets need not align with frames).  A frame the socket takes only in
  part is finished from the endpoint's own output buffer on its own write
  watcher; while that buffer is not empty ``send`` says ``BlockingIOError``,
  so the relay's back-pressure holds (at most one frame is buffered here,
  plus one Pong and one Close).
* ``shutdown(SHUT_WR)`` (the broker ended) sends Close 1000, then the FIN;
  ``close()`` without one (an abort: broker reset, idle, Disconnect,
  shutdown) sends Close 1001 (going away) if the socket takes it at once.

splice(2) is never used here: the relay splices only between kernel sockets.
"""

import errno
import socket

import gevent

from gproxy.errors import FrameError
from gproxy.protocols import wsframe

_SCRATCH = bytearray(64 * 1024)  # one per process: hub callbacks never interleave
_SCRATCH_VIEW = memoryview(_SCRATCH)
_WRITE = 2


class WebSocketError(OSError):
    """The client broke the WebSocket protocol; ``strerror`` is the relay's reason."""


class WebSocketEndpoint:
    """MQTT bytes in and out of a WebSocket client connection (see the module docstring)."""

    __slots__ = ("sock", "parser", "client_close", "close_sent", "_in", "_out", "_pong", "_eof",
                 "_error", "_writer", "_loop", "_shut", "_closed", "_inner_pending",
                 "_sendmsg")

    def __init__(self, sock, parser, loop=None, client_close=None):
        self.sock = sock
        self.parser = parser      # mid-stream: preread read the frames up to the CONNECT
        self.client_close = None  # the code of the client's Close, once it sent one
        self.close_sent = False
        self._in = b""            # MQTT bytes unwrapped, not yet taken by the relay
        self._out = b""           # wire bytes the socket has not taken yet
        self._pong = b""          # the latest Ping's Pong, waiting for _out to drain
        self._eof = False
        self._error = None
        self._writer = None
        self._loop = loop or gevent.get_hub().loop
        self._shut = False        # half-close once _out is flushed
        self._closed = False
        self._inner_pending = getattr(sock, "pending", None)
        self._sendmsg = getattr(sock, "sendmsg", None)
        if client_close is not None:  # its Close came with the CONNECT: end as if read now
            self._closed_by_client(client_close)

    # -- what the relay sees of a socket ------------------------------------
    def fileno(self):
        return self.sock.fileno()

    def pending(self):
        """MQTT bytes (or the end of them) are ready without waiting for the socket."""
        return (bool(self._in) or self._eof or self._error is not None
                or (self._inner_pending is not None and self._inner_pending()))

    def recv_into(self, buf, nbytes=0):
        while not self._in:
            if self._error is not None:
                raise self._error
            if self._eof:
                return 0
            self._read(len(buf))
        n = min(nbytes or len(buf), len(buf), len(self._in))
        buf[:n] = memoryview(self._in)[:n]
        self._in = self._in[n:] if n < len(self._in) else b""
        return n

    def send(self, data):
        if self._out and not self._flush():
            raise BlockingIOError(errno.EAGAIN, "websocket output pending")
        n = len(data)
        if self.close_sent:
            return n  # no data frames after our Close (RFC 6455 §5.5.1)
        header = wsframe.frame_header(wsframe.BINARY, n)
        try:
            if self._sendmsg is not None:
                sent = self._sendmsg((header, data))
            else:
                sent = self.sock.send(header + bytes(data))
        except BlockingIOError:
            sent = 0
        if sent < len(header) + n:
            self._out = (header + bytes(data))[sent:]
            self._watch()
        return n

    def shutdown(self, how):
        if how == socket.SHUT_RD:
            return self.sock.shutdown(how)
        self._send_close(wsframe.NORMAL)
        if how == socket.SHUT_RDWR or not self._out:
            self.sock.shutdown(how)
        else:
            self._shut = True  # after the Close frame is out

    def close(self):
        if self._closed:
            return
        self._closed = True  # from here on nothing waits for the socket
        try:
            if self._error is None:
                self._send_close(wsframe.GOING_AWAY)
            self._flush()
        except OSError:
            pass  # the client is gone
        if self._writer is not None:
            self._writer.stop()
            self._writer.close()
        self.sock.close()

    # -- handover to another process (relay.handoff packs these) -------------
    def movable(self):
        """Only over a kernel socket (not TLS), and not while failing."""
        return self._error is None and self._inner_pending is None and not self._closed

    def export(self):
        """Stop the write watcher; the framing state, for another process."""
        if self._writer is not None:
            self._writer.stop()
        return {"parser": self.parser, "in": self._in, "out": self._out, "pong": self._pong,
                "eof": self._eof, "shut": self._shut, "close_sent": self.close_sent,
                "client_close": self.client_close}

    @classmethod
    def restored(cls, sock, parser, state, loop=None):
        """The endpoint of a handed session: frames go on where the other process stopped."""
        endpoint = cls(sock, parser, loop)
        endpoint._in, endpoint._out = state["in"], state["out"]
        endpoint._pong = state.get("pong") or b""  # (a Ping answered while _out waited)
        endpoint._eof, endpoint._shut = state["eof"], state["shut"]
        endpoint.close_sent, endpoint.client_close = state["close_sent"], state["client_close"]
        if endpoint._out:
            endpoint._watch()
        return endpoint

    def restart(self):
        if self._out:
            self._watch()

    def release(self):
        """Another process owns the connection: close our descriptor, send nothing."""
        self._closed = True
        if self._writer is not None:
            self._writer.stop()
            self._writer.close()
        self.sock.close()

    # -- frames in ----------------------------------------------------------
    def _read(self, size):
        """One read from the socket: MQTT bytes into _in, control frames answered."""
        view = _SCRATCH_VIEW[:min(size, len(_SCRATCH))]
        n = self.sock.recv_into(view)
        if not n:
            self._eof = True  # a TCP close without a Close frame (1006 at the client)
            return
        try:
            events = self.parser.feed(view[:n])
        except FrameError as exc:
            events = exc.events
            self._fail(exc)
        data = []
        for kind, a, _ in events:
            if kind == wsframe.DATA:
                if a:
                    data.append(a)
            elif kind == wsframe.PING:
                self._answer_ping(a)
            elif kind == wsframe.CLOSE:
                self._closed_by_client(a)
        if data:
            self._in = data[0] if len(data) == 1 else b"".join(data)

    def _closed_by_client(self, code):
        self.client_close = code or wsframe.NORMAL
        self._eof = True
        self._send_close(code)  # echo the code (None: an empty Close)

    def _fail(self, exc):
        self._error = WebSocketError(errno.EPROTO, "websocket: %s (close %d)" % (exc, exc.code))
        self._send_close(exc.code, str(exc))

    # -- frames out ---------------------------------------------------------
    def _send_close(self, code, reason=""):
        if self.close_sent:
            return
        self.close_sent = True
        self._pong = b""  # no frame after the Close (§5.5.1)
        self._write(wsframe.encode_frame(wsframe.CLOSE, wsframe.close_payload(code, reason)))

    def _answer_ping(self, payload):
        """A Pong now, or, while the socket is full, in place of any Pong still waiting."""
        if self.close_sent:
            return
        pong = wsframe.encode_frame(wsframe.PONG, payload)
        if self._out:
            self._pong = pong
        else:
            self._write(pong)

    def _write(self, frame):
        if self.close_sent and frame[0] & 0x0F != wsframe.CLOSE:
            return
        self._out += frame
        self._flush()

    def _flush(self):
        """Write what is buffered, then the waiting Pong; True once all of it is out."""
        while self._out:
            try:
                sent = self.sock.send(self._out)
            except BlockingIOError:
                self._watch()
                return False
            self._out = self._out[sent:]
            if not self._out and self._pong:
                self._out, self._pong = self._pong, b""
        if self._writer is not None:
            self._writer.stop()
        if self._shut:
            self._shut = False
            self.sock.shutdown(socket.SHUT_WR)
        return True

    def _watch(self):
        if self._closed:
            return
        if self._writer is None:
            self._writer = self._loop.io(self.sock.fileno(), _WRITE)
        if not self._writer.active:
            self._writer.start(self._writable)

    def _writable(self):
        try:
            self._flush()
        except OSError as exc:  # the relay's reader sees the broken socket too
            self._error = exc
            self._out = self._pong = b""
            self._writer.stop()
