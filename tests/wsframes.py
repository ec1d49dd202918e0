"""An independent WebSocket builder and reader for gproxy's tests (RFC 6455).

Written from the RFC with ``struct``, ``hashlib`` and ``base64`` only, and
importing nothing from gproxy, like tests/packets.py for MQTT: frames and
upgrade requests a test feeds to gproxy, and the answers it checks, never
come from the code under test.
"""

import base64
import hashlib
import os
import struct

CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: RFC 6455 §1.3's example key and the accept value the RFC gives for it.
RFC_KEY = "dGhlIHNhbXBsZSBub25jZQ=="
RFC_ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def frame(opcode, payload=b"", fin=True, mask=b"\x11\x22\x33\x44", rsv=0, length_bytes=None):
    """One frame. ``mask=None`` sends it unmasked; ``length_bytes`` (0, 2 or 8)
    forces a length encoding (to build non-minimal or 64-bit lengths)."""
    payload = bytes(payload)
    n = len(payload)
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    bit = 0x80 if mask is not None else 0
    if length_bytes is None:
        length_bytes = 0 if n < 126 else 2 if n < 65536 else 8
    if length_bytes == 0:
        head = struct.pack("!BB", first, bit | n)
    elif length_bytes == 2:
        head = struct.pack("!BBH", first, bit | 126, n)
    else:
        head = struct.pack("!BBQ", first, bit | 127, n)
    if mask is None:
        return head + payload
    return head + mask + xor(payload, mask)


def xor(data, key):
    """``data`` masked (or unmasked) with the 4-byte ``key`` (RFC 6455 §5.3)."""
    n = len(data)
    stream = (bytes(key) * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


def binary(payload, **kw):
    return frame(BINARY, payload, **kw)


def fragments(payload, sizes, mask=b"\x11\x22\x33\x44"):
    """``payload`` as one binary message split into frames of ``sizes`` bytes
    (the rest in the last frame): binary, continuation..., FIN on the last."""
    out, pos, pieces = b"", 0, []
    for size in sizes:
        pieces.append(payload[pos:pos + size])
        pos += size
    pieces.append(payload[pos:])
    for i, piece in enumerate(pieces):
        out += frame(BINARY if i == 0 else CONT, piece, fin=i == len(pieces) - 1, mask=mask)
    return out


def close(code=None, reason=b"", mask=b"\x11\x22\x33\x44"):
    body = b"" if code is None else struct.pack("!H", code) + reason
    return frame(CLOSE, body, mask=mask)


def accept_for(key):
    return base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()


def new_key():
    return base64.b64encode(os.urandom(16)).decode()


def upgrade_request(path="/mqtt", key=RFC_KEY, host="127.0.0.1", protocols="mqtt",
                    origin=None, version="13", extra=(), drop=(), method="GET",
                    http="HTTP/1.1", eol="\r\n"):
    """A client's upgrade request; ``drop`` leaves out headers by lower-case name."""
    headers = [("Host", host), ("Upgrade", "websocket"), ("Connection", "Upgrade"),
               ("Sec-WebSocket-Key", key), ("Sec-WebSocket-Version", version)]
    if protocols is not None:
        headers.append(("Sec-WebSocket-Protocol", protocols))
    if origin is not None:
        headers.append(("Origin", origin))
    headers = [(k, v) for k, v in headers if k.lower() not in drop] + list(extra)
    lines = ["%s %s %s" % (method, path, http)] + ["%s: %s" % kv for kv in headers]
    return (eol.join(lines) + eol + eol).encode("latin-1")


def read_frame(data, masked=False):
    """``(fin, opcode, payload, rest)`` of the first frame in ``data``, or None
    if it is not all there.  Server frames must not be masked, client frames
    must (``masked``)."""
    if len(data) < 2:
        return None
    first, second = data[0], data[1]
    assert bool(second & 0x80) == masked, "masking is wrong: %r" % data[:16]
    n, pos = second & 0x7F, 2
    if n == 126:
        if len(data) < 4:
            return None
        n, pos = struct.unpack("!H", data[2:4])[0], 4
    elif n == 127:
        if len(data) < 10:
            return None
        n, pos = struct.unpack("!Q", data[2:10])[0], 10
    key = b""
    if masked:
        if len(data) < pos + 4:
            return None
        key, pos = data[pos:pos + 4], pos + 4
    if len(data) < pos + n:
        return None
    payload = data[pos:pos + n]
    if masked:
        payload = xor(payload, key)
    return bool(first & 0x80), first & 0x0F, payload, data[pos + n:]


def close_code(payload):
    return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None


def response_head(data):
    """``(status, {lower name: value}, rest)`` once an HTTP response head is in ``data``."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = data[:end].decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, data[end + 4:]
