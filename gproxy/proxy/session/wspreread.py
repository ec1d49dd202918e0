"""MQTT over WebSocket on an mqtt-proxy route: the upgrade, then the CONNECT from frames.

``preread_mqtt`` hands a client whose first byte is ``G`` to
``preread_websocket`` (docs/websocket.md).  Within the same preread deadline
and size cap as raw MQTT it reads the HTTP upgrade request, applies the
route's ``websocket`` options (path, allowed origins), answers ``101``
(echoing the ``mqtt`` subprotocol), then unwraps masked binary frames
(fragments, continuations, pings before the CONNECT) until the CONNECT is
whole, and checks it with ``preread.read_connect``: the same rules, log lines
and ``mqtt_client_id`` as raw MQTT, so chash balances both alike.

Refusals before the ``101`` get an HTTP status (400, 403, 404, 405, 426,
431); after it, a Close frame with RFC 6455's code (1002 protocol error,
1003 text frame, 1009 too big, 1008 for a CONNECT the route refuses).
Nothing reaches a broker.  In the default mode the session then relays MQTT
to the broker through a ``WebSocketEndpoint`` (``wsendpoint``); in
``passthrough`` mode ``upgrade_upstream`` passes the client's upgrade to the
broker's WebSocket listener after the dial, and the frames follow unchanged.
"""

import logging
import socket
import time

from gproxy.errors import FrameError, HandshakeError, Reject
from gproxy.model.routes import DEFAULT_CONNECT_TIMEOUT
from gproxy.protocols import wsframe, wshandshake
from gproxy.protocols.text import printable
from gproxy.proxy import netio
from gproxy.proxy.accept.tls import TlsEndpoint
from gproxy.proxy.relay.wsendpoint import WebSocketEndpoint
from gproxy.proxy.session.preread import RECV_SIZE, plugin_exit, read_connect

#: Close codes for a CONNECT refused after the 101 (APISIX's 503, in WebSocket terms).
_CLOSE_FOR = {"too_large": wsframe.TOO_BIG, "limit_conn": wsframe.TRY_AGAIN_LATER,
              "limit_rate": wsframe.TRY_AGAIN_LATER}
LINGER = 1.0  # seconds to drain a refused client so the answer is not lost to an RST


class WebSocket:
    """A session's WebSocket state, from the upgrade to the hand-off (``Session.ws``)."""

    __slots__ = ("request", "head", "passthrough", "parser", "client_close", "frames")

    def __init__(self, request, head, passthrough, parser):
        self.request = request
        self.head = head          # the upgrade request as received (passthrough replays it)
        self.passthrough = passthrough
        self.parser = parser      # the frame parser, mid-stream: the endpoint goes on with it
        self.client_close = None  # a Close that came right behind the CONNECT
        self.frames = b""         # every frame byte read after the upgrade, as received

    def wrap(self, sock):
        """The relay's client endpoint: MQTT bytes (terminate) or the socket itself."""
        if self.passthrough:
            return sock
        self.parser.max_payload = None  # the relay streams frames of any size
        return WebSocketEndpoint(sock, self.parser, client_close=self.client_close)


def preread_websocket(s, conf, first, deadline):
    """The upgrade and the CONNECT; returns the bytes to replay to the broker."""
    options = conf.websocket
    s.registry.set_transport(s.info, "wss" if isinstance(s.sock, TlsEndpoint) else "ws")
    request, head, rest = _read_upgrade(s, first, deadline, options)
    s.log(logging.INFO, "websocket upgrade: path=%s subprotocol=%s mode=%s",
          printable(request.path), request.protocol or "-",
          "route" if conf.protocol_level is None  # the refine will know the route's
          else "passthrough" if options.passthrough else "terminate")
    parser = wsframe.FrameParser(masked=True, max_payload=s.settings.max_packet)
    s.ws = WebSocket(request, head, options.passthrough, parser)
    netio.sendall(s.sock, wshandshake.accept_response(request), _left(deadline))
    frames = _Frames(s, parser, rest, deadline, answer_pings=not options.passthrough)
    try:
        mqtt_bytes = read_connect(s, conf, frames.recv)
    except FrameError as exc:
        _close(s.sock, exc.code, deadline, str(exc))
        plugin_exit(s, exc.reason, "websocket: %s" % exc)
    except Reject as exc:
        _close(s.sock, frames.close_code or close_code(exc), deadline)
        raise
    s.ws.client_close = frames.close_code
    s.ws.frames = b"".join(frames.raw)
    return s.ws.frames if options.passthrough else mqtt_bytes


def close_code(exc):
    """The Close code that tells an upgraded client why it was refused (a Reject)."""
    return _CLOSE_FOR.get(exc.reason, wsframe.POLICY_VIOLATION)


def refused_after_upgrade(s, exc):
    """A client that got its ``101`` is refused after all (the route the CONNECT
    chose refuses it): a Close frame with the code for ``exc``, then a short linger."""
    _close(s.sock, s.ws.client_close or close_code(exc), time.monotonic() + LINGER)


def apply_options(s, options):
    """The options of the route a refine chose, for a client already upgraded under
    any candidate's: the path and origin checks, then the mode.  Returns the bytes
    to replay (the frames as received in passthrough mode); Reject if refused."""
    ws = s.ws
    try:
        if not options.enable:
            raise HandshakeError(404, "the route takes no websocket clients", "ws_disabled")
        wshandshake.check_route(ws.request, options.path, options.origins)
    except HandshakeError as exc:
        raise Reject(exc.reason, logging.WARNING,
                     "websocket refused by the route: %d %s: %s", exc.status,
                     wshandshake.REASONS.get(exc.status, "Error"), exc) from None
    ws.passthrough = options.passthrough
    return ws.frames if options.passthrough else None


def _left(deadline):
    return max(0.001, deadline - time.monotonic())


def _read_upgrade(s, buf, deadline, options):
    """``(request, head bytes, bytes after the head)``; a refusal answers and raises Reject."""
    limit = s.settings.max_packet
    try:
        while True:
            request = wshandshake.parse_upgrade(buf, limit)
            if request is not None:
                wshandshake.check_route(request, options.path, options.origins)
                return request, buf[:request.length], buf[request.length:]
            chunk = netio.recv(s.sock, RECV_SIZE, deadline)
            if not chunk:
                plugin_exit(s, "closed", "failed to read the websocket upgrade request: closed")
            buf += chunk
    except HandshakeError as exc:
        _refuse(s, exc, deadline)
    except socket.timeout:
        plugin_exit(s, "timeout", "failed to read the websocket upgrade request: timeout")


def _refuse(s, exc, deadline):
    """Answer the HTTP status, let the client read it, and end the session."""
    _send_and_linger(s.sock, wshandshake.error_response(exc), deadline)
    plugin_exit(s, exc.reason, "websocket handshake refused: %d %s: %s" % (
        exc.status, wshandshake.REASONS.get(exc.status, "Error"), exc))


def _send_and_linger(sock, data, deadline):
    """Send a last answer, then drain what the client still sends (at most ``LINGER``
    seconds, never past the preread deadline) so closing does not reset the answer."""
    try:
        sock.send(data)
        sock.shutdown(socket.SHUT_WR)
        _drain(sock, min(deadline, time.monotonic() + LINGER))
    except OSError:
        pass  # the client is gone: nothing to tell it


def _drain(sock, deadline, limit=64 * 1024):
    while limit > 0:
        try:
            chunk = netio.recv(sock, RECV_SIZE, deadline)
        except socket.timeout:
            return
        if not chunk:
            return
        limit -= len(chunk)


def _close(sock, code, deadline, reason=""):
    """A Close frame with ``code``, if the socket takes it now, then a short linger."""
    _send_and_linger(sock, wsframe.encode_frame(
        wsframe.CLOSE, wsframe.close_payload(code, reason[:100])), deadline)


class _Frames:
    """``recv()`` for ``read_connect``: MQTT bytes from the client's frames (b"" at EOF)."""

    def __init__(self, s, parser, rest, deadline, answer_pings):
        self.sock = s.sock
        self.parser = parser
        self.deadline = deadline
        self.answer_pings = answer_pings  # passthrough: the broker answers the replayed ping
        self.raw = [rest] if rest else []
        self.unread = rest
        self.total = len(rest)
        self.limit = 2 * s.settings.max_packet  # frame overhead included
        self.close_code = None  # set when the client sent Close: echo it (§5.5.1)

    def recv(self):
        while self.close_code is None:
            data = self.unread or netio.recv(self.sock, RECV_SIZE, self.deadline)
            if self.unread:
                self.unread = b""
            else:
                if not data:
                    return b""
                self.raw.append(data)
                self.total += len(data)
            if self.total > self.limit:
                raise FrameError(wsframe.TOO_BIG, "%d bytes of frames before a whole CONNECT "
                                 "(limit %d)" % (self.total, self.limit), "too_large")
            out = b"".join(self._events(self.parser.feed(data)))
            if out:
                return out
        return b""

    def _events(self, events):
        for kind, a, b in events:
            if kind == wsframe.DATA:
                yield a
            elif kind == wsframe.PING and self.answer_pings:
                netio.sendall(self.sock, wsframe.encode_frame(wsframe.PONG, a),
                              _left(self.deadline))
            elif kind == wsframe.CLOSE:
                self.close_code = a or wsframe.NORMAL


def upgrade_upstream(s):
    """Passthrough: the client's upgrade to the broker, and its ``101`` checked and dropped.

    Runs after the dial, before the replay of the frames.  Bytes the broker
    sent after its ``101`` go to the client.  A broker that refuses gets the
    client a Close 1014 (bad gateway).
    """
    ws = s.ws
    sock = s.upstream_sock
    timeout = s.upstream.connect_timeout or s.settings.connect_timeout or DEFAULT_CONNECT_TIMEOUT
    deadline = time.monotonic() + timeout
    buf = b""
    try:
        netio.sendall(sock, ws.head, timeout)
        end = None
        while end is None:
            chunk = netio.recv(sock, RECV_SIZE, deadline)
            if not chunk:
                raise HandshakeError(502, "the broker closed the connection")
            buf += chunk
            end = wshandshake.parse_accept(buf, ws.request.key, s.settings.max_packet)
    except (HandshakeError, OSError) as exc:
        _close(s.sock, wsframe.BAD_GATEWAY, time.monotonic() + LINGER)
        why = (exc.strerror or str(exc)) if isinstance(exc, OSError) else str(exc)
        raise Reject("ws_upstream", logging.ERROR,
                     "websocket upgrade with the broker failed: %s", why) from None
    if len(buf) > end:
        netio.sendall(s.sock, buf[end:], timeout)
        s.info.bytes_out += len(buf) - end
