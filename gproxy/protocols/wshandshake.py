"""Sans-IO WebSocket opening handshake (RFC 6455 §4) for MQTT over WebSocket.

Owns the HTTP/1.1 side of a WebSocket start: ``parse_upgrade`` reads a
client's upgrade request from the bytes received so far ("need more" is
``None``, a refusal is ``HandshakeError`` carrying the HTTP status to answer
with), ``check_route`` applies a route's path and Origin options,
``accept_response``/``error_response`` build what gproxy answers, and
``parse_accept`` checks a broker's ``101`` when gproxy passes the upgrade
through.  MQTT 5.0 §6 / 3.1.1 §6: the subprotocol is ``mqtt`` (``mqttv3.1``
for old MQTT 3.1 clients) and is echoed.  Pure: no sockets, no clocks, no
logging; client-chosen text in messages is escaped with ``printable``.
"""

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass

from gproxy.errors import HandshakeError
from gproxy.protocols.text import printable

#: RFC 6455 §1.3: appended to the client's key before hashing.
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: Subprotocols gproxy accepts, as registered with IANA (MQTT 5.0 §6).
SUBPROTOCOLS = ("mqtt", "mqttv3.1")
VERSION = "13"
MAX_HEADERS = 100
REASONS = {101: "Switching Protocols", 400: "Bad Request", 403: "Forbidden",
           404: "Not Found", 405: "Method Not Allowed", 426: "Upgrade Required",
           431: "Request Header Fields Too Large"}

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # RFC 7230 §3.2.6
_VERSION = re.compile(r"^HTTP/(\d)\.(\d)$")
_CTL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_METHOD = b"GET "


@dataclass(frozen=True)
class UpgradeRequest:
    """What gproxy needs from an upgrade request (headers lower-cased, combined)."""

    target: str
    path: str
    host: str
    key: str
    origin: str
    protocols: tuple   # offered by the client, in its order
    protocol: str      # the one gproxy echoes (None: the client offered none)
    length: int        # bytes of the request head, blank line included


def accept_key(key):
    """``Sec-WebSocket-Accept`` for a client's ``Sec-WebSocket-Key`` (RFC 6455 §4.2.2)."""
    digest = hashlib.sha1(key.encode("ascii") + GUID).digest()
    return base64.b64encode(digest).decode("ascii")


def _bad(message, status=400, reason="ws_bad_request", headers=()):
    return HandshakeError(status, message, reason, headers)


def head_end(buf):
    """``(end of head, blank line length)`` or None: CRLF, or bare LF (RFC 7230 §3.5)."""
    crlf = buf.find(b"\r\n\r\n")
    lf = buf.find(b"\n\n")
    if crlf < 0 and lf < 0:
        return None
    if lf < 0 or 0 <= crlf < lf:
        return crlf + 4
    return lf + 2


def parse_upgrade(buf, max_size=16384):
    """The upgrade request at the start of ``buf``, None for "need more", or HandshakeError.

    Bytes after the request head (frames the client pipelined) are not looked
    at; ``UpgradeRequest.length`` says where they start.
    """
    buf = bytes(buf)
    prefix = buf[:len(_METHOD)]
    if prefix != _METHOD[:len(prefix)]:
        line = buf.split(b"\n", 1)[0][:64]
        if b" " in line:  # a request line with another method
            raise _bad("method %s not allowed" % printable(line.split(b" ", 1)[0]), 405,
                       "ws_method", ("Allow: GET",))
        raise _bad("not an HTTP request line: %s" % printable(line))
    end = head_end(buf)
    if end is None:
        if len(buf) > max_size:
            raise _bad("request head larger than %d bytes" % max_size, 431, "ws_too_large")
        if b"\n" in buf:
            _request_line(buf.split(b"\n", 1)[0].rstrip(b"\r").decode("latin-1"))
        return None
    if end > max_size:
        raise _bad("request head larger than %d bytes" % max_size, 431, "ws_too_large")
    lines = buf[:end].decode("latin-1").split("\n")
    lines = [ln[:-1] if ln.endswith("\r") else ln for ln in lines][:-2]
    target = _request_line(lines[0])
    return _request(target, _headers(lines[1:]), end)


def _request_line(line):
    """``GET <target> HTTP/1.1``: returns the target."""
    parts = line.split(" ")
    if len(parts) != 3 or not parts[1] or _CTL.search(line):
        raise _bad("malformed request line: %s" % printable(line[:200]))
    method, target, version = parts
    if method != "GET":
        raise _bad("method %s not allowed" % printable(method), 405, "ws_method", ("Allow: GET",))
    found = _VERSION.match(version)
    if not found:
        raise _bad("malformed HTTP version: %s" % printable(version))
    if (int(found.group(1)), int(found.group(2))) < (1, 1):  # RFC 6455 §4.1 item 2
        raise _bad("a WebSocket upgrade needs HTTP/1.1, got %s" % version)
    return target


def _headers(lines):
    """Header lines as ``{lower-case name: [values]}`` (RFC 7230 §3.2)."""
    if len(lines) > MAX_HEADERS:
        raise _bad("more than %d header lines" % MAX_HEADERS, 431, "ws_too_large")
    found = {}
    for line in lines:
        if line[:1] in (" ", "\t"):
            raise _bad("obsolete header line folding")  # RFC 7230 §3.2.4
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.match(name):
            raise _bad("malformed header line: %s" % printable(line[:200]))
        value = value.strip(" \t")
        if _CTL.search(value):
            raise _bad("control character in header %s" % name)
        found.setdefault(name.lower(), []).append(value)
    return found


def _tokens(values):
    """Comma-separated list values (several header lines combined), lower-cased."""
    return [t.strip(" \t").lower() for v in values or () for t in v.split(",") if t.strip(" \t")]


def _one(headers, name, required=True):
    values = headers.get(name.lower())
    if not values:
        if required:
            raise _bad("missing %s header" % name)
        return None
    if len(values) > 1:
        raise _bad("more than one %s header" % name)
    return values[0]


def _request(target, headers, length):
    host = _one(headers, "Host")
    if "websocket" not in _tokens(headers.get("upgrade")):
        # a plain GET (or another upgrade): tell it to speak WebSocket (RFC 7231 §6.5.15)
        raise _bad("no Upgrade: websocket header", 426, "ws_upgrade_required",
                   ("Upgrade: websocket",))
    if "upgrade" not in _tokens(headers.get("connection")):
        raise _bad("no Connection: upgrade header")
    version = _one(headers, "Sec-WebSocket-Version", required=False)
    if version != VERSION:  # RFC 6455 §4.4
        raise _bad("unsupported Sec-WebSocket-Version: %s" % printable(version or "(none)"),
                   426, "ws_version", ("Sec-WebSocket-Version: " + VERSION,))
    key = _one(headers, "Sec-WebSocket-Key")
    try:
        raw_key = base64.b64decode(key.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raw_key = b""
    if len(raw_key) != 16:  # RFC 6455 §4.1 item 7
        raise _bad("invalid Sec-WebSocket-Key: %s" % printable(key[:64]))
    if headers.get("transfer-encoding") or any(v != "0" for v in headers.get("content-length", ())):
        raise _bad("an upgrade request has no body")
    offered = tuple(t.strip(" \t") for v in headers.get("sec-websocket-protocol", ())
                    for t in v.split(",") if t.strip(" \t"))
    chosen = next((p for p in offered if p in SUBPROTOCOLS), None)
    if offered and chosen is None:
        raise _bad("no MQTT subprotocol offered (mqtt or mqttv3.1): %s"
                   % printable(", ".join(offered)[:200]), reason="ws_subprotocol")
    return UpgradeRequest(target, _path(target), host, key,
                          _one(headers, "Origin", required=False), offered, chosen, length)


def _path(target):
    """The path of an origin-form or absolute-form target, without the query."""
    if not target.startswith("/"):
        scheme, sep, rest = target.partition("://")
        if not sep or scheme.lower() not in ("ws", "wss", "http", "https"):
            raise _bad("malformed request target: %s" % printable(target[:200]))
        slash = rest.find("/")
        target = "/" if slash < 0 else rest[slash:]
    return target.split("?", 1)[0].split("#", 1)[0]


def check_route(request, path=None, origins=None):
    """Apply a route's options: ``path`` (exact, None: any) and ``origins`` (None: any).

    A request without ``Origin`` passes the origin check: browsers always send
    one (RFC 6455 §4.1 item 8, §10.2) and other clients can send any.
    """
    if path is not None and request.path != path:
        raise _bad("path %s not served (expected %s)" % (printable(request.path[:200]), path),
                   404, "ws_path")
    if origins is not None and request.origin is not None \
            and request.origin.lower() not in origins:
        raise _bad("origin %s not allowed" % printable(request.origin[:200]), 403, "ws_origin")


def accept_response(request):
    """The ``101 Switching Protocols`` answer, echoing the chosen subprotocol."""
    lines = ["HTTP/1.1 101 Switching Protocols", "Upgrade: websocket", "Connection: Upgrade",
             "Sec-WebSocket-Accept: " + accept_key(request.key)]
    if request.protocol:
        lines.append("Sec-WebSocket-Protocol: " + request.protocol)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def error_response(exc):
    """A short plain-text HTTP answer for a HandshakeError; the connection then closes."""
    phrase = REASONS.get(exc.status, "Error")
    body = ("%d %s\n" % (exc.status, phrase)).encode("ascii")
    # RFC 7230 §6.7: a response that names an Upgrade also lists it in Connection
    upgrade = any(h.lower().startswith("upgrade:") for h in exc.headers)
    lines = ["HTTP/1.1 %d %s" % (exc.status, phrase),
             "Connection: Upgrade, close" if upgrade else "Connection: close",
             "Content-Type: text/plain", "Content-Length: %d" % len(body)]
    lines.extend(exc.headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body


def parse_accept(buf, key, max_size=16384):
    """A broker's answer to an upgrade gproxy passed through.

    Returns None ("need more") or the length of the response head (bytes
    after it are the broker's first frames); raises HandshakeError (status
    502) unless it is a ``101`` with the right ``Sec-WebSocket-Accept``.
    """
    buf = bytes(buf)
    end = head_end(buf)
    if end is None:
        if len(buf) > max_size:
            raise _bad("broker's response head larger than %d bytes" % max_size, 502,
                       "ws_upstream")
        return None
    lines = [ln.rstrip("\r") for ln in buf[:end].decode("latin-1").split("\n")][:-2]
    status = lines[0].split(" ", 2)
    if len(status) < 2 or not _VERSION.match(status[0]) or status[1] != "101":
        raise _bad("broker refused the upgrade: %s" % printable(lines[0][:200]), 502,
                   "ws_upstream")
    try:
        headers = _headers(lines[1:])
        accept = _one(headers, "Sec-WebSocket-Accept")
    except HandshakeError as exc:
        raise _bad("broker's 101: %s" % exc, 502, "ws_upstream") from None
    if accept != accept_key(key):
        raise _bad("broker's Sec-WebSocket-Accept does not match the key", 502, "ws_upstream")
    return end
