"""Sans-IO PROXY protocol: read the header a front load balancer puts before the
client's bytes, and build the one gproxy puts before them toward a broker.

Follows HAProxy's specification (``doc/proxy-protocol.txt``): version 1 is one
text line (``PROXY TCP4 <src> <dst> <sport> <dport>\\r\\n``, at most 107
bytes), version 2 a 16-byte binary header (12-byte signature, version and
command, family and transport, length) followed by the address block and
optional TLVs, which are skipped.  ``parse(buf)`` says "need more" (None),
returns a ``ProxyHeader``, or raises ``MalformedHeader``; ``wanted(buf)`` says
how many bytes to wait for, so a caller can peek without reading past the
header.  Pure: no sockets, no logging.
"""

import ipaddress
import struct
from dataclasses import dataclass

from gproxy.errors import MalformedHeader

V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest v1 line, CRLF included (spec §2.1)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER = 16
#: v2 address block sizes (spec §2.2): INET 4+4+2+2, INET6 16+16+2+2, UNIX 108+108.
_V2_ADDR = {0x1: 12, 0x2: 36, 0x3: 216}
LOCAL, PROXY = 0x0, 0x1


@dataclass(frozen=True)
class ProxyHeader:
    """What the front load balancer told us. ``src``/``dst`` are None when the
    header carries no usable TCP addresses (v2 LOCAL, v1 UNKNOWN, UNIX, UDP):
    the connection's own addresses then stand."""

    version: int
    length: int  # bytes of the header on the wire
    src: tuple = None  # (ip text, port)
    dst: tuple = None


def _starts_like(buf, prefix):
    n = min(len(buf), len(prefix))
    return bytes(buf[:n]) == prefix[:n]


def wanted(buf):
    """Total bytes worth waiting for before calling ``parse`` again."""
    if buf[:1] == b"\r" and _starts_like(buf, V2_SIGNATURE):
        if len(buf) < V2_HEADER:
            return V2_HEADER
        return V2_HEADER + struct.unpack_from("!H", buf, 14)[0]
    return min(len(buf) + 1, V1_MAX)


def parse(buf):
    """The header at the start of ``buf``; None while incomplete."""
    if not buf:
        return None
    if buf[:1] == b"\r" and _starts_like(buf, V2_SIGNATURE):
        return _parse_v2(buf)
    if _starts_like(buf, V1_PREFIX):
        return _parse_v1(buf)
    raise MalformedHeader("not a PROXY protocol header")


def _parse_v1(buf):
    end = bytes(buf[:V1_MAX]).find(b"\r\n")
    if end < 0:
        if len(buf) >= V1_MAX:
            raise MalformedHeader("PROXY v1 line longer than 107 bytes")
        return None
    try:
        line = bytes(buf[:end]).decode("ascii")
    except UnicodeDecodeError:
        raise MalformedHeader("PROXY v1 line is not ASCII") from None
    fields = line.split(" ")
    if len(fields) >= 2 and fields[1] == "UNKNOWN":
        return ProxyHeader(1, end + 2)  # the rest of an UNKNOWN line is ignored (§2.1)
    if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
        raise MalformedHeader("bad PROXY v1 line")
    version = 4 if fields[1] == "TCP4" else 6
    src = (_ip(fields[2], version), _port(fields[4]))
    dst = (_ip(fields[3], version), _port(fields[5]))
    return ProxyHeader(1, end + 2, src, dst)


def _ip(text, version):
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise MalformedHeader("bad address in PROXY v1 line") from None
    if addr.version != version:
        raise MalformedHeader("address family does not match the PROXY v1 protocol")
    return str(addr)


def _port(text):
    if not text.isdigit() or not text.isascii() or len(text) > 5 or int(text) > 65535 \
            or (len(text) > 1 and text[0] == "0"):
        raise MalformedHeader("bad port in PROXY v1 line")
    return int(text)


def _parse_v2(buf):
    if len(buf) < V2_HEADER:
        if len(buf) > 12 and buf[12] >> 4 != 2:
            raise MalformedHeader("PROXY v2 header with version %d" % (buf[12] >> 4))
        return None if _starts_like(buf, V2_SIGNATURE) else _bad_signature()
    if bytes(buf[:12]) != V2_SIGNATURE:
        _bad_signature()
    ver_cmd, fam, length = struct.unpack_from("!BBH", buf, 12)
    if ver_cmd >> 4 != 2:
        raise MalformedHeader("PROXY v2 header with version %d" % (ver_cmd >> 4))
    command = ver_cmd & 0x0F
    if command not in (LOCAL, PROXY):
        raise MalformedHeader("PROXY v2 header with command %d" % command)
    total = V2_HEADER + length
    if len(buf) < total:
        return None
    family, transport = fam >> 4, fam & 0x0F
    if family > 3 or transport > 2:
        raise MalformedHeader("PROXY v2 header with family/protocol 0x%02x" % fam)
    need = _V2_ADDR.get(family, 0)
    if length < need:
        raise MalformedHeader("PROXY v2 address block too short (%d bytes)" % length)
    if command == LOCAL or transport != 1 or family not in (1, 2):
        return ProxyHeader(2, total)  # health check, UNIX or UDP: keep the real endpoints
    if family == 1:
        src, dst, sport, dport = struct.unpack_from("!4s4sHH", buf, V2_HEADER)
    else:
        src, dst, sport, dport = struct.unpack_from("!16s16sHH", buf, V2_HEADER)
    return ProxyHeader(2, total, (str(ipaddress.ip_address(src)), sport),
                       (str(ipaddress.ip_address(dst)), dport))


def _bad_signature():
    raise MalformedHeader("bad PROXY v2 signature")


# -- building the header gproxy sends -----------------------------------------

def _pair(src, dst):
    """Both addresses in one family: IPv4 ones become IPv4-mapped if the other is IPv6."""
    a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if a.version != b.version:
        a, b = (ipaddress.IPv6Address("::ffff:%s" % x) if x.version == 4 else x for x in (a, b))
    return a, b


def build_v1(src, sport, dst, dport):
    """``PROXY TCP4|TCP6 <src> <dst> <sport> <dport>\\r\\n`` (what nginx's ``proxy_protocol on`` sends)."""
    a, b = _pair(src, dst)
    return ("PROXY TCP%d %s %s %d %d\r\n" % (a.version, _text(a), _text(b), sport, dport)
            ).encode("ascii")


def _text(addr):
    mapped = getattr(addr, "ipv4_mapped", None)
    return "::ffff:%s" % mapped if mapped else str(addr)


def build_v2(src, sport, dst, dport):
    """The binary v2 header, command PROXY over TCP, no TLVs."""
    a, b = _pair(src, dst)
    fam = 0x11 if a.version == 4 else 0x21
    body = a.packed + b.packed + struct.pack("!HH", sport, dport)
    return V2_SIGNATURE + struct.pack("!BBH", 0x21, fam, len(body)) + body
