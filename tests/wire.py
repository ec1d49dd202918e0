"""Independent builders for what arrives before MQTT: PROXY protocol headers and
TLS ClientHellos, for gproxy's tests.

PROXY headers are written by hand from HAProxy's ``doc/proxy-protocol.txt``
with ``struct`` and ``socket.inet_pton`` only; ClientHellos come from OpenSSL
itself (Python's ``ssl`` with memory BIOs) or are assembled by hand from RFC
8446.  Nothing here imports gproxy (STYLE.md habit 8).
"""

import socket
import ssl
import struct

V2_SIG = b"\x0D\x0A\x0D\x0A\x00\x0D\x0A\x51\x55\x49\x54\x0A"


# -- PROXY protocol ------------------------------------------------------------

def proxy_v1(src, dst, sport, dport, proto=None):
    """``PROXY TCP4 1.2.3.4 5.6.7.8 1111 2222\\r\\n`` (spec §2.1)."""
    proto = proto or ("TCP6" if ":" in src else "TCP4")
    return ("PROXY %s %s %s %d %d\r\n" % (proto, src, dst, sport, dport)).encode()


def proxy_v1_unknown(tail=""):
    return ("PROXY UNKNOWN%s\r\n" % tail).encode()


def proxy_v2(src, dst, sport, dport, command=1, tlvs=b"", transport=1):
    """The binary header (spec §2.2): signature, 0x2<cmd>, family/transport, length."""
    family = socket.AF_INET6 if ":" in src else socket.AF_INET
    fam = (0x20 if family == socket.AF_INET6 else 0x10) | transport
    body = (socket.inet_pton(family, src) + socket.inet_pton(family, dst)
            + struct.pack("!HH", sport, dport) + tlvs)
    return V2_SIG + struct.pack("!BBH", 0x20 | command, fam, len(body)) + body


def proxy_v2_local(body=b""):
    """A LOCAL command (a load balancer's health check), AF_UNSPEC."""
    return V2_SIG + struct.pack("!BBH", 0x20, 0x00, len(body)) + body


def tlv(kind, value):
    return struct.pack("!BH", kind, len(value)) + value


# -- TLS ClientHello -------------------------------------------------------------

def openssl_client_hello(server_name=None, max_version=None):
    """The first flight of a real OpenSSL client (the records, as sent on the wire)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if max_version is not None:
        ctx.maximum_version = max_version
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_side=False, server_hostname=server_name)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def _vec(size, data):
    return len(data).to_bytes(size, "big") + data


def client_hello(server_name=None, extensions=None, names=None):
    """A ClientHello built by hand (RFC 8446 §4.1.2), in one handshake message.

    ``names``: raw ``(name_type, bytes)`` entries for the server_name extension.
    """
    exts = list(extensions or [])
    if names is None and server_name is not None:
        names = [(0, server_name.encode())]
    if names is not None:
        entries = b"".join(bytes((t,)) + _vec(2, n) for t, n in names)
        exts.insert(0, (0, _vec(2, entries)))
    body = (b"\x03\x03" + b"\x11" * 32 + _vec(1, b"\x22" * 32) + _vec(2, b"\x13\x01\x13\x02")
            + _vec(1, b"\x00"))
    if exts or extensions is not None:
        body += _vec(2, b"".join(struct.pack("!HH", t, len(d)) + d for t, d in exts))
    return b"\x01" + len(body).to_bytes(3, "big") + body


def records(message, sizes=None, version=b"\x03\x01"):
    """``message`` cut into handshake records of ``sizes`` bytes (one record if None)."""
    sizes = list(sizes or [len(message)])
    out, pos = b"", 0
    while pos < len(message):
        n = sizes.pop(0) if sizes else len(message) - pos
        frag = message[pos:pos + n]
        out += b"\x16" + version + struct.pack("!H", len(frag)) + frag
        pos += n
    return out
