"""Sans-IO parsing of the MQTT CONNECT packet, the way APISIX's mqtt-proxy reads it.

This module owns the byte-level rules only: given the bytes a client has sent
so far, say "need more", return the parsed CONNECT, or raise MalformedPacket.
It does no I/O, no logging and knows nothing of routes.

The rules mirror ``apisix/stream/plugins/mqtt-proxy.lua`` (see
docs/apisix-behaviour.md §1-2): the fixed-header byte must be 16..32, the
protocol name is read with Lua's clamping ``string.sub``, connect flags and
keep-alive are checked for nothing (the keep-alive is read, when present,
only so the session's idle timeout can follow it), MQTT 5 properties are
skipped by length, and the client identifier of the payload is read.  Where APISIX would hang or
crash on short data we reject with a clear line instead (§2).

gproxy also reads the username (for the ``mqtt_username`` variable, an
extension APISIX lacks): only when the username flag is set, by skipping the
Will fields; never the password.  A username that cannot be read leaves it
unset and rejects nothing, so every CONNECT APISIX accepts is accepted here.
"""

from dataclasses import dataclass

from gproxy.errors import MalformedPacket
from gproxy.protocols.text import printable

#: nginx's default ``preread_buffer_size``; a CONNECT longer than this is refused.
DEFAULT_MAX_PACKET = 16 * 1024

# MQTT 5.0 §1.5.5: a variable byte integer has at most four bytes.
_VBI_MAX_BYTES = 4


@dataclass(slots=True)
class ConnectPacket:
    """What gproxy needs from a CONNECT. Never holds credentials.

    (Not frozen: a frozen dataclass pays a call per field to be built, on
    every session's path; nothing keeps or shares these, so nothing changes
    them either.)
    """

    protocol_name: bytes
    protocol_level: int
    client_id: bytes
    length: int  # bytes of the whole packet, fixed header included
    username: bytes = None  # None: no username flag, or unreadable
    keep_alive: int = None  # seconds (MQTT 3.1.1 §3.1.2.10); 0: the client sets none

    @property
    def client_id_text(self):
        """The client id for logs and the dashboard (undecodable bytes escaped)."""
        return self.client_id.decode("utf-8", "backslashreplace")

    @property
    def username_text(self):
        return None if self.username is None else self.username.decode(
            "utf-8", "backslashreplace")


def encode_varint(value):
    """MQTT variable byte integer (§1.5.5): seven bits a byte, least significant first."""
    if not 0 <= value < 128 ** _VBI_MAX_BYTES:
        raise ValueError("variable byte integer out of range: %d" % value)
    out = bytearray()
    while True:
        value, digit = divmod(value, 128)
        if not value:
            out.append(digit)
            return bytes(out)
        out.append(digit | 0x80)


def decode_varint(buf, offset):
    """Decode an MQTT variable byte integer starting at ``buf[offset]``.

    Returns ``(value, next_offset)``, or ``None`` when ``buf`` ends before the
    last byte.  Like APISIX, decoding stops after four bytes even if the
    fourth still has its continuation bit set; the caller decides whether
    that is acceptable.
    """
    if offset < len(buf) and buf[offset] < 0x80:
        return buf[offset], offset + 1  # one byte: most remaining lengths
    value = 0
    multiplier = 1
    for i in range(offset, offset + _VBI_MAX_BYTES):
        if i >= len(buf):
            return None
        byte = buf[i]
        value += (byte & 0x7F) * multiplier
        multiplier *= 128
        if not byte & 0x80:
            return value, i + 1
    return value, offset + _VBI_MAX_BYTES


def check_first_byte(byte):
    """Raise unless ``byte`` may start a CONNECT (APISIX accepts 16..32)."""
    if byte < 16 or byte > 32:
        raise MalformedPacket(
            "failed to parse the msg header: "
            "Received unexpected MQTT packet type+flags: %d" % byte)


def packet_length(buf, max_packet=DEFAULT_MAX_PACKET):
    """Length of the whole first packet, or ``None`` if the header is incomplete.

    Raises MalformedPacket for a bad first byte, a remaining length whose
    fourth byte still has the continuation bit (MQTT 5.0 §1.5.5), or a packet
    longer than ``max_packet`` (nginx: "preread buffer full").
    """
    header = _fixed_header(buf, max_packet)
    return None if header is None else header[0]


def _fixed_header(buf, max_packet):
    """``(whole packet length, fixed header length)`` of the first packet, or None."""
    if not buf:
        return None
    check_first_byte(buf[0])
    decoded = decode_varint(buf, 1)
    if decoded is None:
        return None
    remaining, hdr_len = decoded
    if buf[hdr_len - 1] & 0x80:
        raise MalformedPacket(
            "failed to parse the msg header: malformed remaining length")
    total = hdr_len + remaining
    if total > max_packet:
        raise MalformedPacket(
            "failed to read the Connect Command: preread buffer full "
            "(packet of %d bytes, limit %d)" % (total, max_packet),
            reason="too_large")
    return total, hdr_len


def parse_connect(buf, max_packet=DEFAULT_MAX_PACKET):
    """Parse the CONNECT at the start of ``buf``.

    Returns ``None`` while more bytes are needed, a ConnectPacket once the
    whole packet is buffered (bytes after it are ignored), or raises
    MalformedPacket.  The protocol name and level are *not* checked here:
    that depends on the route (see ``check_protocol``).
    """
    header = _fixed_header(buf, max_packet)
    if header is None or len(buf) < header[0]:
        return None
    total, hdr_len = header
    pkt = bytes(buf[:total])  # (the same object when buf is exactly the packet)
    return _parse_variable_part(pkt, hdr_len)


def _short(field):
    return MalformedPacket(
        "failed to parse the Connect Command: packet ends inside the %s" % field)


def _parse_variable_part(pkt, pos):
    size = len(pkt)
    if pos + 2 > size:
        raise _short("protocol name length")
    name_len = (pkt[pos] << 8) | pkt[pos + 1]
    pos += 2
    name = pkt[pos:pos + name_len]  # clamps like Lua's string.sub
    pos += name_len
    if pos >= size:
        raise _short("protocol level")
    level = pkt[pos]
    flags = pkt[pos + 1] if pos + 1 < size else 0
    # Connect flags and keep alive are not checked (APISIX skips them); the
    # keep alive is kept when both its bytes are there, for the idle timeout.
    keep_alive = (pkt[pos + 2] << 8) | pkt[pos + 3] if pos + 4 <= size else None
    pos += 1 + 3
    if level == 5:
        props = decode_varint(pkt, pos)
        if props is None:
            raise _short("properties length")
        props_len, pos = props
        pos += props_len
    if pos + 2 > size:
        raise _short("client identifier length")
    expect_len = pos + 2 + ((pkt[pos] << 8) | pkt[pos + 1])
    if expect_len > size:
        raise MalformedPacket(
            "failed to parse mqtt request, expect len: %d but got %d" % (expect_len, size))
    username = _username(pkt, expect_len, flags, level) if flags & 0x80 else None
    return ConnectPacket(name, level, pkt[pos + 2:expect_len], size, username, keep_alive)


def _username(pkt, pos, flags, level):
    """The username after the Will fields (MQTT 5.0 §3.1.3), or None."""
    if not flags & 0x80:
        return None
    if flags & 0x04:  # Will Flag: (5.0: Will Properties), Will Topic, Will Payload
        if level == 5:
            props = decode_varint(pkt, pos)
            if props is None:
                return None
            pos = props[1] + props[0]
        for _ in range(2):
            if pos + 2 > len(pkt):
                return None
            pos += 2 + ((pkt[pos] << 8) | pkt[pos + 1])
    if pos + 2 > len(pkt):
        return None
    end = pos + 2 + ((pkt[pos] << 8) | pkt[pos + 1])
    return pkt[pos + 2:end] if end <= len(pkt) else None


def check_protocol(packet, protocol_name, protocol_level):
    """Apply the route's mqtt-proxy conf, in APISIX's order and wording."""
    if packet.protocol_name != protocol_name.encode():
        raise MalformedPacket(
            "expect protocol name: %s, but got %s"
            % (protocol_name, printable(packet.protocol_name)),
            reason="protocol_name")
    if packet.protocol_level != protocol_level:
        raise MalformedPacket(
            "expect protocol level: %s, but got %d"
            % (protocol_level, packet.protocol_level),
            reason="protocol_level")

