"""An independent MQTT packet builder for gproxy's tests.

Built from the MQTT specifications with ``struct`` only, and deliberately
importing nothing from gproxy: a test that builds its input with the code under
test proves nothing (STYLE.md habit 8, paho-mqtt's ``tests/paho_test.py``).
Compare packets byte for byte with :func:`assert_packet`, which shows a hex
dump of both sides on mismatch.

Section numbers refer to MQTT 3.1.1 (OASIS, 2014) and MQTT 5.0 (OASIS, 2019).
"""

import struct

# -- primitives --------------------------------------------------------------

#: MQTT 3.1.1 §2.2.2 / 5.0 §1.5.5: the largest value of a variable byte integer.
VARINT_MAX = 268_435_455

CONNECT = 0x10
PUBLISH = 0x30
PINGREQ = 0xC0
DISCONNECT = 0xE0

#: Protocol name and level for each protocol version (3.1.1 §3.1.2.1-2).
PROTOCOLS = {3: b"MQIsdp", 4: b"MQTT", 5: b"MQTT"}


def encode_varint(value):
    """MQTT variable byte integer: 7 bits a byte, least significant first."""
    if not 0 <= value <= VARINT_MAX:
        raise ValueError("varint out of range: %r" % value)
    out = bytearray()
    while True:
        value, digit = divmod(value, 128)
        if value:
            out.append(digit | 0x80)
        else:
            out.append(digit)
            return bytes(out)


def _bytes(value):
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


def encode_string(value):
    """UTF-8 string or binary data: 2-byte big-endian length, then the bytes."""
    data = _bytes(value)
    return struct.pack("!H", len(data)) + data


def fixed_header(first_byte, remaining_length):
    """Byte 0 (type and flags) followed by the remaining length."""
    return struct.pack("!B", first_byte) + encode_varint(remaining_length)


def packet(first_byte, body):
    """A whole control packet: fixed header plus ``body``."""
    return fixed_header(first_byte, len(body)) + body


# -- MQTT 5.0 properties (§2.2.2.2) ------------------------------------------

def prop_session_expiry(seconds):
    """Session Expiry Interval (0x11), four-byte integer."""
    return struct.pack("!BI", 0x11, seconds)


def prop_receive_maximum(value):
    """Receive Maximum (0x21), two-byte integer."""
    return struct.pack("!BH", 0x21, value)


def prop_user(key, value):
    """User Property (0x26), a UTF-8 string pair; may repeat."""
    return b"\x26" + encode_string(key) + encode_string(value)


def properties(*props):
    """A property block: varint length, then the concatenated properties."""
    data = b"".join(props)
    return encode_varint(len(data)) + data


# -- CONNECT (3.1.1 §3.1, 5.0 §3.1) --------------------------------------------

def connect_flags(clean_session=True, will=False, will_qos=0, will_retain=False,
                  username=False, password=False):
    """The connect flags byte (3.1.1 §3.1.2.3): bit 0 is reserved, left 0."""
    return ((username << 7) | (password << 6) | (will_retain << 5)
            | (will_qos << 3) | (will << 2) | (clean_session << 1))


def connect(client_id=b"", level=4, *, protocol_name=None, clean_session=True,
            keepalive=60, will_topic=None, will_payload=b"", will_qos=0,
            will_retain=False, username=None, password=None, props=b"",
            will_props=b"", first_byte=CONNECT):
    """A CONNECT packet for protocol ``level`` 3 (MQTT 3.1), 4 (3.1.1) or 5.

    ``props`` and ``will_props`` are raw property bytes (without the length;
    see the ``prop_*`` helpers) and are only written for level 5.
    ``protocol_name`` overrides the name that goes with the level.
    """
    name = PROTOCOLS.get(level, b"MQTT") if protocol_name is None else _bytes(protocol_name)
    will = will_topic is not None
    flags = connect_flags(clean_session, will, will_qos, will_retain,
                          username is not None, password is not None)
    body = encode_string(name) + struct.pack("!BBH", level, flags, keepalive)
    if level == 5:
        body += properties(props)
    body += encode_string(client_id)
    if will:
        if level == 5:
            body += properties(will_props)
        body += encode_string(will_topic) + encode_string(will_payload)
    if username is not None:
        body += encode_string(username)
    if password is not None:
        body += encode_string(password)
    return packet(first_byte, body)


def connect_v31(client_id=b"", **kw):
    """MQTT 3.1: protocol name ``MQIsdp``, level 3."""
    return connect(client_id, 3, **kw)


def connect_v311(client_id=b"", **kw):
    """MQTT 3.1.1: protocol name ``MQTT``, level 4."""
    return connect(client_id, 4, **kw)


def connect_v5(client_id=b"", props=b"", **kw):
    """MQTT 5.0: protocol name ``MQTT``, level 5, with property bytes ``props``."""
    return connect(client_id, 5, props=props, **kw)


# -- other packets -----------------------------------------------------------

def publish(topic, payload=b"", qos=0, packet_id=1, retain=False, dup=False,
            level=4, props=b""):
    """PUBLISH (3.1.1 §3.3); the packet id is written only for QoS 1 and 2."""
    first = PUBLISH | (dup << 3) | (qos << 1) | retain
    body = encode_string(topic)
    if qos:
        body += struct.pack("!H", packet_id)
    if level == 5:
        body += properties(props)
    return packet(first, body + _bytes(payload))


def pingreq():
    """PINGREQ (3.1.1 §3.12): two bytes."""
    return packet(PINGREQ, b"")


def disconnect(level=4, reason_code=None, props=b""):
    """DISCONNECT (3.1.1 §3.14); for level 5 an optional reason code (5.0 §3.14.2)."""
    if level != 5 or reason_code is None:
        return packet(DISCONNECT, b"")
    return packet(DISCONNECT, struct.pack("!B", reason_code) + properties(props))


# -- the byte vectors of docs/apisix-behaviour.md §1.1 -------------------------

C4_FOO = bytes.fromhex("10 0f 00 04 4d 51 54 54 04 02 00 3c 00 03 66 6f 6f")
C4_EMPTY = bytes.fromhex("10 0c 00 04 4d 51 54 54 04 02 00 3c 00 00")
C5_EMPTY = bytes.fromhex("10 0d 00 04 4d 51 54 54 05 02 00 3c 00 00 00")
C5_PROPS = bytes.fromhex(
    "10 1b 00 04 4d 51 54 54 05 02 00 3c 05 11 00 00 0e 10"
    " 00 09 63 6c 69 6e 74 2d 31 31 31")
C5_F = bytes.fromhex("10 0e 00 04 4d 51 54 54 05 02 00 3c 00 00 01 66")
C5_G = bytes.fromhex("10 0e 00 04 4d 51 54 54 05 02 00 3c 00 00 01 67")

#: name -> (bytes, protocol level, client id, remaining length), as in §1.1.
SPEC_VECTORS = {
    "C4-foo": (C4_FOO, 4, b"foo", 15),
    "C4-empty": (C4_EMPTY, 4, b"", 12),
    "C5-empty": (C5_EMPTY, 5, b"", 13),
    "C5-props": (C5_PROPS, 5, b"clint-111", 27),
    "C5-f": (C5_F, 5, b"f", 14),
    "C5-g": (C5_G, 5, b"g", 14),
}


# -- assertion helpers -------------------------------------------------------

def hexdump(data, width=16):
    """Offset, hex bytes and printable ASCII, ``width`` bytes a line."""
    data = bytes(data)
    if not data:
        return "(0 bytes)"
    lines = []
    for off in range(0, len(data), width):
        chunk = data[off:off + width]
        hexes = " ".join("%02x" % b for b in chunk)
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append("%04x  %-*s  %s" % (off, width * 3 - 1, hexes, text))
    return "\n".join(lines)


def assert_packet(got, expected, name="packet"):
    """Byte-for-byte comparison; on mismatch show where and both hex dumps."""
    got, expected = bytes(got), bytes(expected)
    if got == expected:
        return
    diff = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b),
                min(len(got), len(expected)))
    raise AssertionError(
        "%s differs at byte %d (got %d bytes, expected %d)\n"
        "got:\n%s\nexpected:\n%s"
        % (name, diff, len(got), len(expected), hexdump(got), hexdump(expected)))
