"""Sans-IO reading of a TLS ClientHello's server name (SNI), before any handshake.

APISIX picks the certificate in its ``ssl_client_hello`` phase, from the
ClientHello alone (``apisix/init.lua`` ``ssl_client_hello_phase``), and so
does gproxy: the name chooses which certificate, and whether a client
certificate is required, before OpenSSL sees a byte.  That is why this module
exists: a per-connection SSL object cannot change its client-certificate mode
once made.  Reads TLS records (RFC 8446 §5.1) until the first handshake
message is whole (it may span records), checks that it is a ClientHello
(§4.1.2) and reads the ``server_name`` extension (RFC 6066 §3).

``parse(buf, limit)`` returns None while more bytes are needed, a
``ClientHello``, or raises ``MalformedHeader``; ``wanted(buf)`` is how many
bytes to wait for.  Pure: no sockets, no ssl module, no logging.
"""

import struct
from dataclasses import dataclass

from gproxy.errors import MalformedHeader

HANDSHAKE = 0x16
CLIENT_HELLO = 0x01
SERVER_NAME = 0x0000
HOST_NAME = 0x00
MAX_FRAGMENT = 1 << 14  # RFC 8446 §5.1: a plaintext record carries at most 2^14 bytes


@dataclass(frozen=True)
class ClientHello:
    server_name: str = None  # lower case, no trailing dot (as APISIX's server_name())
    length: int = 0  # bytes of the records that carried it


def _records(buf):
    """``(handshake bytes so far, offset after them, bytes wanted or None)``."""
    data = bytearray()
    pos = 0
    while True:
        if len(buf) < pos + 5:
            return data, pos, pos + 5
        rtype, major, length = buf[pos], buf[pos + 1], struct.unpack_from("!H", buf, pos + 3)[0]
        if rtype != HANDSHAKE:
            raise MalformedHeader("not a TLS handshake record (first byte 0x%02x)" % rtype)
        if major != 3 or not 0 < length <= MAX_FRAGMENT:
            raise MalformedHeader("bad TLS record header")
        if len(buf) < pos + 5 + length:
            return data, pos, pos + 5 + length
        data += buf[pos + 5:pos + 5 + length]
        pos += 5 + length
        if len(data) >= 4 and len(data) >= 4 + _u24(data, 1):
            return data, pos, None


def _u24(data, at):
    return (data[at] << 16) | (data[at + 1] << 8) | data[at + 2]


def wanted(buf):
    """Total bytes worth waiting for (never more than the next whole record)."""
    try:
        _, pos, want = _records(buf)
    except MalformedHeader:
        return len(buf) + 1  # parse() will say what is wrong
    return want if want is not None else pos


def parse(buf, limit=MAX_FRAGMENT):
    """The ClientHello at the start of ``buf``, None while incomplete.

    ``limit`` bounds the bytes on the wire (records included) a ClientHello
    may take, as ``preread_buffer_size`` bounds a CONNECT.
    """
    if len(buf) >= 1 and buf[0] != HANDSHAKE:
        raise MalformedHeader("not a TLS handshake record (first byte 0x%02x)" % buf[0])
    data, pos, want = _records(buf)
    if len(data) >= 1 and data[0] != CLIENT_HELLO:
        raise MalformedHeader("first handshake message is not a ClientHello")
    if want is not None:
        if want > limit:
            raise MalformedHeader("ClientHello larger than %d bytes" % limit)
        return None
    body = bytes(data[4:4 + _u24(data, 1)])
    return ClientHello(_server_name(body), pos)


class _Reader:
    """Length-prefixed fields of a handshake body; running short is malformed."""

    def __init__(self, data):
        self.data, self.pos = data, 0

    def take(self, n):
        if self.pos + n > len(self.data):
            raise MalformedHeader("ClientHello ends inside a field")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def vector(self, size_bytes):
        return self.take(int.from_bytes(self.take(size_bytes), "big"))

    @property
    def left(self):
        return len(self.data) - self.pos


def _server_name(body):
    r = _Reader(body)
    r.take(2 + 32)  # legacy_version, random
    r.vector(1)  # legacy_session_id
    r.vector(2)  # cipher_suites
    r.vector(1)  # legacy_compression_methods
    if not r.left:
        return None  # no extensions at all (allowed before TLS 1.3)
    exts = _Reader(r.vector(2))
    while exts.left:
        ext_type = int.from_bytes(exts.take(2), "big")
        ext = exts.vector(2)
        if ext_type == SERVER_NAME:
            return _host_name(ext)
    return None


def _host_name(ext):
    names = _Reader(_Reader(ext).vector(2))
    while names.left:
        name_type = names.take(1)[0]
        name = names.vector(2)
        if name_type == HOST_NAME:
            if not name or not all(0x21 <= b < 0x7F for b in name):
                raise MalformedHeader("bad server name in ClientHello")
            text = name.decode("ascii").lower()
            return text[:-1] if text.endswith(".") else text
    return None
