"""Sans-IO WebSocket frames (RFC 6455 §5) as a stream of MQTT bytes and control events.

MQTT over WebSocket (MQTT 5.0 §6, 3.1.1 §6) sends MQTT bytes in *binary*
data frames, with no alignment between frames and packets, so the receiving
side is a byte stream, not a message queue.  ``FrameParser.feed(data)``
accounts for the bytes received so far and returns events, in order:

* ``(DATA, payload, last)``: unmasked payload bytes of a binary message, as
  they arrive (a frame's payload is never buffered whole); ``last`` is True
  on the final bytes of a message;
* ``(PING, payload, None)``, ``(PONG, payload, None)``: control frames, whole;
* ``(CLOSE, code, reason)``: the peer's Close (code None: it sent none).

An empty list is "need more".  Anything RFC 6455 says to fail the connection
for raises ``FrameError`` with the close code to send (§7.4.1): 1002 for a
protocol error (unmasked client frame, reserved bits or opcodes, fragmented
or oversize control frames, a continuation out of place, a bad close
payload), 1003 for a text frame (MQTT §6: only binary frames are allowed),
1007 for a close reason that is not UTF-8, 1009 for a frame over
``max_payload``.  The parser also builds frames: ``frame_header`` and
``encode_frame`` (server frames are unmasked; tests mask their own), and
``close_payload``.  Pure: no I/O; it keeps no reference to the buffers fed.
"""

import struct

from gproxy.errors import FrameError

CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
DATA = "data"
#: §7.4.1 status codes, plus IANA's 1013 (try again later) and 1014 (bad gateway).
NORMAL, GOING_AWAY, PROTOCOL_ERROR, UNSUPPORTED_DATA = 1000, 1001, 1002, 1003
INVALID_DATA, POLICY_VIOLATION, TOO_BIG, INTERNAL_ERROR = 1007, 1008, 1009, 1011
TRY_AGAIN_LATER, BAD_GATEWAY = 1013, 1014
MAX_CONTROL = 125
_FIN, _RSV, _MASKED = 0x80, 0x70, 0x80
_KNOWN = (CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG)
_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")


def valid_close_code(code):
    """May a peer send ``code`` in a Close frame (§7.4.1-7.4.2, IANA registry)?"""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def unmask(data, key, offset=0):
    """``data`` XOR the 4-byte masking ``key`` starting at key byte ``offset`` (§5.3).

    With the ``websockets`` package's C routine (its ``speedups.apply_mask``,
    SIMD-friendly, ~400x the pure-Python speed on 64 KiB), else ``unmask_py``.
    """
    if offset:
        key = key[offset:] + key[:offset]
    return _apply_mask(data, key)


def unmask_py(data, key):
    """``unmask`` in pure Python: one big-integer XOR instead of a loop over bytes."""
    n = len(data)
    if not n:
        return b""
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(stream, "little")).to_bytes(n, "little")


try:  # a C extension: optional, so a platform without its wheel still works
    from websockets.speedups import apply_mask as _apply_mask
except ImportError:  # pragma: no cover - depends on the installation
    _apply_mask = unmask_py


def frame_header(opcode, length, fin=True, mask=None):
    """The header of one frame (§5.2): minimal length encoding, optional masking key."""
    first = (_FIN if fin else 0) | opcode
    bit = _MASKED if mask is not None else 0
    if length < 126:
        head = bytes((first, bit | length))
    elif length < 0x10000:
        head = bytes((first, bit | 126)) + _U16.pack(length)
    else:
        head = bytes((first, bit | 127)) + _U64.pack(length)
    return head + mask if mask is not None else head


def encode_frame(opcode, payload=b"", fin=True, mask=None):
    """One whole frame; ``mask`` (4 bytes) masks the payload, as a client must."""
    payload = bytes(payload)
    body = unmask(payload, mask) if mask is not None else payload
    return frame_header(opcode, len(payload), fin, mask) + body


def close_payload(code=None, reason=""):
    """A Close frame's body: nothing, or the code and a UTF-8 reason (§5.5.1)."""
    if code is None:
        return b""
    return _U16.pack(code) + reason.encode("utf-8")[:MAX_CONTROL - 2]


class FrameParser:
    """The frames one peer sends, as events (see the module docstring).

    ``masked``: frames from a client must be masked and frames from a server
    must not (§5.1).  ``max_payload`` (None: no limit) bounds a data frame's
    declared length.
    """

    __slots__ = ("masked", "max_payload", "_head", "_left", "_key", "_offset", "_fin",
                 "_control", "_body", "_message", "closed")

    def __init__(self, masked=True, max_payload=None):
        self.masked = masked
        self.max_payload = max_payload
        self._head = b""       # a frame header split across feeds, so far
        self._left = 0         # payload bytes of the current data frame still to come
        self._key = None       # its masking key
        self._offset = 0       # where in the key its next byte is
        self._fin = False
        self._control = None   # (opcode, key, length) of a control frame being collected
        self._body = bytearray()
        self._message = False  # a binary message is in progress (continuations expected)
        self.closed = False    # the peer's Close was seen: nothing after it counts

    def feed(self, data):
        events = []
        try:
            self._feed(memoryview(data), events)
        except FrameError as exc:
            exc.events = events
            raise
        return events

    def _feed(self, data, events):
        pos, end = 0, len(data)
        while pos < end and not self.closed:
            if self._left:
                pos = self._payload(data, pos, end, events)
            elif self._control is not None:
                pos = self._collect(data, pos, end, events)
            else:
                pos = self._header(data, pos, end, events)

    def _payload(self, data, pos, end, events):
        take = self._left if self._left <= end - pos else end - pos
        chunk = data[pos:pos + take]
        if self._key is not None:
            payload = unmask(chunk, self._key, self._offset)
            self._offset = (self._offset + take) & 3
        else:
            payload = bytes(chunk)
        self._left -= take
        events.append((DATA, payload, not self._left and self._fin))
        return pos + take

    def _header(self, data, pos, end, events):
        head = self._head + bytes(data[pos:pos + 14 - len(self._head)])
        if len(head) < 2:
            self._head = head
            return end
        first, second = head[0], head[1]
        opcode = self._check_first(first)
        if bool(second & _MASKED) != self.masked:
            raise FrameError(PROTOCOL_ERROR, "client frame not masked" if self.masked
                             else "server frame masked")
        short = second & 0x7F
        need = 2 + (2 if short == 126 else 8 if short == 127 else 0) + (4 if self.masked else 0)
        if len(head) < need:
            self._head = head
            return end
        used = need - len(self._head)
        self._head = b""
        if short == 126:
            length = _U16.unpack_from(head, 2)[0]
        elif short == 127:
            length = _U64.unpack_from(head, 2)[0]
            if length >> 63:
                raise FrameError(PROTOCOL_ERROR, "frame length has its top bit set")
        else:
            length = short
        key = head[need - 4:need] if self.masked else None
        self._start(opcode, bool(first & _FIN), length, key, events)
        return pos + used

    def _check_first(self, first):
        opcode = first & 0x0F
        if first & _RSV:  # no extension was negotiated (§5.2)
            raise FrameError(PROTOCOL_ERROR, "reserved bits set (no extension negotiated)")
        if opcode not in _KNOWN:
            raise FrameError(PROTOCOL_ERROR, "reserved opcode 0x%x" % opcode)
        if opcode >= CLOSE and not first & _FIN:
            raise FrameError(PROTOCOL_ERROR, "fragmented control frame")  # §5.5
        if opcode == TEXT:
            raise FrameError(UNSUPPORTED_DATA, "text frame (MQTT needs binary frames)",
                             "ws_unsupported_data")
        if opcode == BINARY and self._message:
            raise FrameError(PROTOCOL_ERROR, "new data frame inside a fragmented message")
        if opcode == CONTINUATION and not self._message:
            raise FrameError(PROTOCOL_ERROR, "continuation frame without a message")
        return opcode

    def _start(self, opcode, fin, length, key, events):
        if opcode >= CLOSE:
            if length > MAX_CONTROL:
                raise FrameError(PROTOCOL_ERROR, "control frame of %d bytes (max 125)" % length)
            self._control = (opcode, key, length)
            if not length:
                self._control_done(events)
            return
        if self.max_payload is not None and length > self.max_payload:
            raise FrameError(TOO_BIG, "frame of %d bytes (limit %d)" % (length, self.max_payload),
                             "ws_too_big")
        self._message = not fin
        self._fin = fin
        self._key = key
        self._offset = 0
        self._left = length
        if not length:
            events.append((DATA, b"", fin))

    def _collect(self, data, pos, end, events):
        opcode, key, length = self._control
        take = min(length - len(self._body), end - pos)
        self._body += data[pos:pos + take]
        if len(self._body) == length:
            self._control_done(events)
        return pos + take

    def _control_done(self, events):
        opcode, key, _ = self._control
        body = bytes(self._body)
        self._control = None
        self._body = bytearray()
        if key is not None:
            body = unmask(body, key)
        if opcode == CLOSE:
            code, reason = parse_close(body)
            self.closed = True
            events.append((CLOSE, code, reason))
        else:
            events.append((PING if opcode == PING else PONG, body, None))


def parse_close(body):
    """``(code, reason)`` of a Close frame's body; FrameError if it is invalid (§5.5.1)."""
    if not body:
        return None, ""
    if len(body) == 1:
        raise FrameError(PROTOCOL_ERROR, "close frame with a 1-byte body")
    code = _U16.unpack_from(body)[0]
    if not valid_close_code(code):
        raise FrameError(PROTOCOL_ERROR, "invalid close code %d" % code)
    try:
        reason = body[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise FrameError(INVALID_DATA, "close reason is not UTF-8", "ws_invalid_data") from None
    return code, reason
