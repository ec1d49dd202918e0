"""PROXY protocol phases: take the client's address from a front load
balancer's header, and put a header before the bytes sent to a broker.

APISIX's listener object form (docs/apisix-behaviour.md §7):
``proxy_protocol: true`` makes nginx read a v1 or v2 header before anything
else (``listen ... proxy_protocol``); gproxy then uses the address in it as
``remote_addr`` for matching, hashing, logs and the dashboard, as nginx's
realip module would.  A missing or malformed header closes the connection
(nginx: ``broken header``).  ``proxy_protocol_to_upstream: true`` sends the
header nginx's ``proxy_protocol on`` sends (v1; v2 with
``gproxy.proxy_protocol.upstream_version: 2``) on every connection to a node,
before TLS and before the replayed bytes (the dial phase sends ``s.preamble``).
"""

import ipaddress
import logging
import socket
import time

from gproxy.errors import MalformedHeader, Reject
from gproxy.protocols import proxyproto
from gproxy.protocols.text import printable
from gproxy.proxy import netio

READING = "reading PROXY protocol"  # nginx's log action


def read_header(s):
    """A ``proxy_protocol: true`` listener's first phase."""
    s.action = READING
    deadline = time.monotonic() + s.settings.preread_timeout
    buf = b""
    try:
        while True:
            header = proxyproto.parse(buf)
            if header is not None:
                break
            want = proxyproto.wanted(buf)
            if want > s.settings.max_packet:
                raise MalformedHeader("header longer than %d bytes" % s.settings.max_packet)
            buf = netio.peek(s.sock, want, deadline)
            if len(buf) < want and proxyproto.parse(buf) is None:
                raise Reject("closed", logging.INFO, "client closed connection")
        netio.recv_exact(s.sock, header.length, deadline)  # the header only: peeked, now taken
    except MalformedHeader:
        raise Reject("proxy_protocol", logging.ERROR, 'broken header: "%s"',
                     printable(bytes(buf[:proxyproto.V1_MAX]))) from None
    except socket.timeout:
        raise Reject("timeout", logging.INFO, "client timed out") from None
    if header.src is not None:
        info = s.info
        info.client_addr, info.client_port = _plain(header.src[0]), header.src[1]
    s.log(logging.INFO, "PROXY protocol v%d header: client %s:%d", header.version,
          s.info.client_addr, s.info.client_port)


def _plain(ip):
    mapped = getattr(ipaddress.ip_address(ip), "ipv4_mapped", None)
    return str(mapped) if mapped else ip


def upstream_header(version=1):
    """The phase that prepares the header for the node (after ``read_header``, if any)."""
    build = proxyproto.build_v2 if version == 2 else proxyproto.build_v1

    def prepare_upstream_header(s):
        info = s.info
        s.preamble = build(info.client_addr, info.client_port,
                           info.server_addr, info.server_port)

    return prepare_upstream_header
