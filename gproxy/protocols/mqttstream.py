"""Where MQTT packets begin and end in a byte stream, without reading their bodies.

The relay forwards bytes as they come; to end a session cleanly (shutdown,
evict, drain) it must stop exactly between two packets and append a
DISCONNECT there, so the broker never sees half a packet and publishes no
Will.  ``Boundaries`` follows one direction of a session by reading only each
packet's fixed header (type byte + remaining length, MQTT 5.0 §2.1) and
skipping its body by length, so its cost grows with the number of packets,
not bytes, and a packet body can be moved without ever entering Python.

Also builds the few packets gproxy itself sends: DISCONNECT (MQTT 3.1.1
§3.14, 5.0 §3.14), and the CONNECT of its MQTT health probe with a reader for
the broker's CONNACK (§3.1, §3.2).  Pure: no I/O.
"""

from gproxy.errors import MalformedPacket
from gproxy.protocols.mqtt import decode_varint, encode_varint

#: MQTT 5.0 §3.14.2.1 reason codes gproxy sends.
NORMAL = 0x00
SERVER_SHUTTING_DOWN = 0x8B
USE_ANOTHER_SERVER = 0x9C
#: MQTT 5.0 §3.14.2.2.5: Server Reference property identifier.
SERVER_REFERENCE = 0x1C
DISCONNECT_TYPE = 0xE0


class Boundaries:
    """Packet boundaries of one direction of an MQTT byte stream.

    ``feed(data, start, end)`` accounts for ``data[start:end]``.  ``left`` is
    how many bytes of the current packet are still to come (0 between
    packets, unless a header is split across reads: see ``at_boundary``).
    ``lost`` becomes True if the stream stops looking like MQTT (a remaining
    length longer than four bytes); from then on no boundary is known.
    """

    __slots__ = ("left", "header", "lost", "packets")

    def __init__(self):
        self.left = 0        # body bytes of the current packet still to come
        self.header = b""    # a fixed header split across reads, so far
        self.lost = False
        self.packets = 0     # whole packets seen (headers parsed)

    @property
    def at_boundary(self):
        """True when the bytes so far end exactly after a whole packet."""
        return not self.lost and self.left == 0 and not self.header

    def feed(self, data, start=0, end=None):
        """Account for ``data[start:end]`` (the relay calls this for every read)."""
        if end is None:
            end = len(data)
        pos, left = start, self.left
        while not self.lost:
            if left:
                room = end - pos
                if left >= room:
                    self.left = left - room
                    return
                pos += left
                left = 0
            if pos >= end:
                break
            if not self.header and pos + 1 < end:
                # The common cases, a whole header inside this chunk, decoded inline:
                # a one-byte length (packets under 130 bytes: pings, acks, small
                # messages), then up to three (under 2 MiB).
                b1 = data[pos + 1]
                if b1 < 0x80:
                    left = b1
                    pos += 2
                    self.packets += 1
                    continue
                if pos + 3 >= end:
                    left, size = 0, 0  # may end in the next chunk: the general way
                else:
                    b2 = data[pos + 2]
                    if b2 < 0x80:
                        left, size = (b1 & 0x7F) | (b2 << 7), 3
                    else:
                        b3 = data[pos + 3]
                        left = (b1 & 0x7F) | ((b2 & 0x7F) << 7) | ((b3 & 0x7F) << 14)
                        size = 4 if b3 < 0x80 else 0
                if size:
                    pos += size
                    self.packets += 1
                    continue
                left = 0
            self.left = 0
            pos = self._header(data, pos, end)
            left = self.left
        self.left = left

    def advance(self, n, marks):
        """Account for ``n`` bytes moved without reading them, given their ``marks``.

        ``marks`` lists the fixed headers that begin in those bytes (and any
        after them), found by peeking (``walk_headers``): ``(offset, data,
        size)`` with ``offset`` counted from where this stream stood (negative
        for the rest of a header begun before), ``data`` bytes that start
        with the header and ``size`` the whole packet's (None: ``data`` is a
        header cut short; 0: not an MQTT header, the stream is lost past it).  The state after is what ``feed`` of those bytes
        would have left.
        """
        if not marks or marks[0][0] >= n:
            self.left -= n
            return
        if marks[-1][0] < n:  # every mark inside: the common case
            count, last = len(marks), marks[-1]
        else:
            count = 0
            while marks[count][0] < n:
                count += 1
            last = marks[count - 1]
        offset, data, size = last
        taken = n - offset  # bytes of that packet moved so far
        if size == 0 and taken >= 5:  # a fifth length byte went by, as feed would see
            self.lost = True
            count -= 1
        elif size is None or size == 0 or taken < _header_size(data):
            self.header, self.left = bytes(data[:taken]), 0  # the move ended in its header
            count -= 1
        else:
            self.header, self.left = b"", size - taken
        self.packets += count

    def next_boundary(self, data, start=0, end=None, stop=True):
        """Advance over ``data[start:end]``.

        With ``stop``: returns the offset (in ``data``) of the first packet
        boundary at or after ``start`` and stops there, or None after taking
        all of it when no boundary lies inside.  A boundary at ``start`` itself
        counts when the stream is already between packets.
        """
        if end is None:
            end = len(data)
        pos = start
        while True:
            if self.lost:
                return None
            if self.left:
                step = self.left if self.left <= end - pos else end - pos
                self.left -= step
                pos += step
                if self.left:
                    return None  # the packet goes on past this chunk
                continue
            if not self.header and stop:
                return pos  # between two packets
            if pos >= end:
                return None
            pos = self._header(data, pos, end)

    def _header(self, data, pos, end):
        """Parse (part of) a fixed header from ``data[pos:end]``; returns the new offset."""
        header = self.header + bytes(data[pos:min(end, pos + 5 - len(self.header))])
        value, multiplier = 0, 1
        for i in range(1, len(header)):
            byte = header[i]
            value += (byte & 0x7F) * multiplier
            if not byte & 0x80:
                used = i + 1 - len(self.header)  # bytes of this chunk in the header
                self.header = b""
                self.left = value
                self.packets += 1
                return pos + used
            multiplier *= 128
            if i == 4:
                self.lost = True  # a fifth length byte: not MQTT (§1.5.5)
                return end
        self.header = header  # the header goes on in the next chunk
        return end


def _header_size(data):
    """Bytes of the (whole) fixed header ``data`` starts with (MQTT 5.0 §2.1.1)."""
    size = 2
    while data[size - 1] & 0x80:
        size += 1
    return size


def disconnect(level, reason=NORMAL, server_reference=None):
    """A DISCONNECT for a client or broker speaking protocol ``level``.

    MQTT 3.1.1 and 3.1 have no reason code (``e0 00``); for MQTT 5.0 a normal
    disconnection is also ``e0 00`` (§3.14.2.1: reason 0 may be omitted), and
    any other reason is sent with its code and, for 0x9C, an optional Server
    Reference.
    """
    if level != 5 or (reason == NORMAL and server_reference is None):
        return bytes((DISCONNECT_TYPE, 0))
    props = b""
    if server_reference:
        ref = server_reference.encode("utf-8")
        props = bytes((SERVER_REFERENCE,)) + len(ref).to_bytes(2, "big") + ref
    body = bytes((reason,)) + encode_varint(len(props)) + props
    return bytes((DISCONNECT_TYPE,)) + encode_varint(len(body)) + body


CONNACK_TYPE = 0x20
_PROTOCOL = {3: b"MQIsdp", 4: b"MQTT", 5: b"MQTT"}


def _string(data):
    return len(data).to_bytes(2, "big") + data


def connect(client_id, level=4, keep_alive=0, username=None, password=None):
    """A clean-session CONNECT with no Will (MQTT 3.1.1 §3.1, 5.0 §3.1)."""
    flags = 0x02  # clean session / clean start
    payload = _string(client_id.encode("utf-8"))
    if username is not None:
        flags |= 0x80
        payload += _string(username.encode("utf-8"))
    if password is not None:
        flags |= 0x40
        payload += _string(password.encode("utf-8"))
    body = _string(_PROTOCOL[level]) + bytes((level, flags)) + keep_alive.to_bytes(2, "big")
    if level == 5:
        body += b"\x00"  # no properties
    body += payload
    return bytes((0x10,)) + encode_varint(len(body)) + body


def connack_code(buf):
    """The CONNACK return/reason code at the start of ``buf``, or None if incomplete.

    0 is success for every level (3.1.1 §3.2.2.3, 5.0 §3.2.2.2).  Raises
    MalformedPacket when the first packet is not a CONNACK.
    """
    if not buf:
        return None
    if buf[0] != CONNACK_TYPE:
        raise MalformedPacket("expected a CONNACK, got packet type+flags %d" % buf[0])
    decoded = decode_varint(buf, 1)
    if decoded is None:
        return None
    remaining, start = decoded
    if remaining < 2:
        raise MalformedPacket("CONNACK too short")
    if len(buf) < start + 2:
        return None
    return buf[start + 1]
