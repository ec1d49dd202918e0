"""MQTT 3.1.1 packets for the load generator, built with ``struct`` only.

Independent of gproxy (like tests/packets.py) so the benchmark exercises the
proxy with bytes it did not produce.  Section numbers refer to MQTT 3.1.1.
"""

import struct

CONNACK_OK = b"\x20\x02\x00\x00"      # §3.2: session present 0, return code 0
PINGREQ = b"\xc0\x00"                 # §3.12
PINGRESP = b"\xd0\x00"                # §3.13
DISCONNECT = b"\xe0\x00"              # §3.14


def varint(value):
    """§2.2.3 remaining length: 7 bits a byte, least significant first."""
    out = bytearray()
    while True:
        value, digit = divmod(value, 128)
        out.append(digit | (0x80 if value else 0))
        if not value:
            return bytes(out)


def string(data):
    """§1.5.3 UTF-8 string: 2-byte big-endian length, then the bytes."""
    return struct.pack("!H", len(data)) + data


def packet(first_byte, body):
    return bytes([first_byte]) + varint(len(body)) + body


def connect(client_id, keepalive=0):
    """§3.1 CONNECT, protocol MQTT level 4, clean session, no will/credentials."""
    header = string(b"MQTT") + struct.pack("!BBH", 4, 0x02, keepalive)
    return packet(0x10, header + string(client_id))


def subscribe(topic, packet_id=1, qos=0):
    """§3.8 SUBSCRIBE (fixed header flags 0b0010) to one topic filter."""
    return packet(0x82, struct.pack("!H", packet_id) + string(topic) + bytes([qos]))


def suback(packet_id=1, qos=0):
    """§3.9 the SUBACK a broker grants for :func:`subscribe`."""
    return b"\x90\x03" + struct.pack("!H", packet_id) + bytes([qos])


def publish(topic, payload):
    """§3.3 PUBLISH at QoS 0 (no packet identifier), not retained."""
    return packet(0x30, string(topic) + payload)


class ConnectTemplate:
    """CONNECT packets whose client ids differ only in a fixed-width counter.

    Built once, then each id costs one bytes join in the hot loop.
    """

    WIDTH = 10

    def __init__(self, prefix, keepalive=0):
        sample = connect(prefix + b"0" * self.WIDTH, keepalive)
        cut = len(sample) - self.WIDTH
        self.head, self.prefix = sample[:cut], prefix

    def build(self, n):
        return self.head + b"%010d" % n
