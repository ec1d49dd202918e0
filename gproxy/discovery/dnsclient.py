"""A small cooperative DNS client: dnspython for the messages, gevent sockets for the I/O.

dnspython builds and parses every message (``dns.message``), so no wire
format is written here; its own query functions wait with ``select``
themselves, which would hold the hub of a process that is not
monkey-patched (gproxy embedded in a synchronous program), so the sending
and waiting are done here on gevent sockets: UDP first, TCP when the answer
is truncated, each server in turn, ``TIMEOUT`` seconds per try and
``ROUNDS`` rounds over the servers (APISIX's dns client: 2 s, 5
transmissions).  ``lookup(name, rdtype)`` answers ``Answer`` (the records of
that type, CNAMEs followed by the server, and the smallest TTL) or raises
``NoSuchName`` (NXDOMAIN: an authoritative "no") or ``DnsFailure`` (every
server failed, timed out or answered SERVFAIL/REFUSED/...: nothing is known).
"""

import socket
import struct
from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.resolver
import gevent
from gevent import socket as gsocket

TIMEOUT = 2.0
ROUNDS = 5
DNS_PORT = 53


class DnsFailure(Exception):
    """No server gave an answer: the last good one stays in use."""


class NoSuchName(Exception):
    """NXDOMAIN: the name does not exist."""


@dataclass(frozen=True)
class Answer:
    records: tuple  # rdata objects of the asked type (dnspython's)
    ttl: int


def parse_server(text):
    """``(ip, port)`` from ``ip``, ``ip:port``, ``[v6]:port`` or a bare IPv6 address."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else DNS_PORT
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, int(port)
    return text, DNS_PORT


def servers_from_resolv_conf(path):
    """The ``nameserver`` lines of a resolv.conf (parsed by dnspython)."""
    resolver = dns.resolver.Resolver(filename=path, configure=True)
    return [(ns, resolver.port) for ns in resolver.nameservers]


class DnsClient:
    def __init__(self, servers, timeout=TIMEOUT, rounds=ROUNDS):
        self.servers = list(servers)  # [(ip, port)]
        self.timeout = timeout
        self.rounds = rounds

    def lookup(self, name, rdtype):
        """The records of ``rdtype`` ("A", "AAAA", "SRV", "CNAME") for ``name``."""
        query = dns.message.make_query(name, rdtype)
        errors = []
        for _ in range(self.rounds):
            for server in self.servers:
                try:
                    reply = self._exchange(query, server)
                except (OSError, dns.exception.DNSException, EOFError) as exc:
                    errors.append("%s:%d: %s" % (server[0], server[1], _text(exc)))
                    continue
                rcode = reply.rcode()
                if rcode == dns.rcode.NXDOMAIN:
                    raise NoSuchName("%s: name error (NXDOMAIN)" % name)
                if rcode != dns.rcode.NOERROR:
                    errors.append("%s:%d: %s" % (server[0], server[1], dns.rcode.to_text(rcode)))
                    continue
                return _answer(reply, dns.rdatatype.from_text(rdtype))
            if errors and all("refused" in e.lower() for e in errors[-len(self.servers):]):
                break  # every server is down (ICMP refused): no use asking again now
        raise DnsFailure("failed to query the DNS server: " + "; ".join(errors[-3:]))

    def _exchange(self, query, server):
        reply = self._udp(query, server)
        if reply.flags & dns.flags.TC:
            reply = self._tcp(query, server)
        return reply

    def _udp(self, query, server):
        family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
        sock = gsocket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(server)  # a dead server's ICMP comes back as ECONNREFUSED
            sock.send(query.to_wire())
            with gevent.Timeout(self.timeout, socket.timeout("timed out")):
                while True:
                    reply = dns.message.from_wire(sock.recv(65535), ignore_trailing=True)
                    if query.is_response(reply):
                        return reply  # anything else is a stray datagram: wait on
        finally:
            sock.close()

    def _tcp(self, query, server):
        family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
        sock = gsocket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(server)
            wire = query.to_wire()
            sock.sendall(struct.pack("!H", len(wire)) + wire)
            size = struct.unpack("!H", _read(sock, 2))[0]
            return dns.message.from_wire(_read(sock, size))
        finally:
            sock.close()


def _read(sock, size):
    out = b""
    while len(out) < size:
        chunk = sock.recv(size - len(out))
        if not chunk:
            raise EOFError("connection closed")
        out += chunk
    return out


def _answer(reply, rdtype):
    records, ttls = [], []
    for rrset in reply.answer:
        ttls.append(rrset.ttl)  # CNAMEs on the way count: the answer lives as long as they do
        if rrset.rdtype == rdtype:
            records.extend(rrset)
    return Answer(tuple(records), min(ttls) if ttls else 0)


def _text(exc):
    if isinstance(exc, socket.timeout):
        return "timeout"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
