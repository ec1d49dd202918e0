"""Rewrite a CONNECT's client identifier or username, as NGINX Plus's
``mqtt_set_connect`` does, and re-encode it with its new remaining length.

Unlike the preread parser (``mqtt``), which reads only what APISIX reads,
this one walks every field of the packet (MQTT 3.1.1 §3.1, 5.0 §3.1), because
it must put each back: fixed-header byte, protocol name and level, connect
flags, keep alive, the MQTT 5 properties (kept byte for byte), client id,
Will properties, topic and payload, username, password.  Bytes after the last
field (which a broker would refuse) are kept as they are.  A packet whose
fields do not add up raises MalformedPacket: a route that asked for a rewrite
never replays a CONNECT it could not re-encode.  Pure: bytes in, bytes out.
"""

import struct

from gproxy.errors import MalformedPacket
from gproxy.protocols.mqtt import decode_varint, encode_varint

USERNAME_FLAG = 0x80
PASSWORD_FLAG = 0x40
WILL_FLAG = 0x04


class _Fields:
    """A cursor over the packet body that raises MalformedPacket when it runs short."""

    def __init__(self, body):
        self.body, self.pos = body, 0

    def take(self, n, what):
        if self.pos + n > len(self.body):
            raise MalformedPacket("failed to rewrite the CONNECT: packet ends inside the %s"
                                  % what)
        out = self.body[self.pos:self.pos + n]
        self.pos += n
        return out

    def string(self, what):
        size = self.take(2, what + " length")
        return self.take(struct.unpack("!H", size)[0], what)

    def properties(self, what):
        decoded = decode_varint(self.body, self.pos)
        if decoded is None or self.body[decoded[1] - 1] & 0x80:
            raise MalformedPacket("failed to rewrite the CONNECT: bad %s length" % what)
        length, start = decoded
        raw = self.body[self.pos:start]
        self.pos = start
        return raw + self.take(length, what)


def _string(value):
    return struct.pack("!H", len(value)) + value


def rewrite(packet, client_id=None, username=None):
    """``packet`` (one whole CONNECT) with the given fields replaced.

    ``client_id``/``username`` are bytes, or None to keep the packet's own.
    Setting a username sets the username flag.
    """
    if len(client_id or b"") > 0xFFFF or len(username or b"") > 0xFFFF:
        raise MalformedPacket("failed to rewrite the CONNECT: a field is longer than 65535")
    packet = bytes(packet)
    decoded = decode_varint(packet, 1)
    if decoded is None or len(packet) != decoded[1] + decoded[0]:
        raise MalformedPacket("failed to rewrite the CONNECT: not one whole packet")
    f = _Fields(packet[decoded[1]:])
    head = _string(f.string("protocol name"))
    level, flags = f.take(2, "protocol level")
    keepalive = f.take(2, "keep alive")
    props = f.properties("properties") if level == 5 else b""
    old_id = f.string("client identifier")
    will = b""
    if flags & WILL_FLAG:
        will_props = f.properties("will properties") if level == 5 else b""
        will = will_props + _string(f.string("will topic")) + _string(f.string("will payload"))
    old_user = f.string("username") if flags & USERNAME_FLAG else None
    password = _string(f.string("password")) if flags & PASSWORD_FLAG else b""
    rest = f.body[f.pos:]
    if username is not None:
        flags |= USERNAME_FLAG
    else:
        username = old_user
    body = (head + bytes((level, flags)) + keepalive + props
            + _string(old_id if client_id is None else client_id) + will
            + (b"" if username is None else _string(username)) + password + rest)
    return packet[:1] + encode_varint(len(body)) + body
