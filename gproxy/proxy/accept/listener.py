"""Listeners: bound sockets, the StreamServer that accepts on them, and the
phases every session accepted there goes through.

A listener knows its own address text (``0.0.0.0:9100``, nginx's ``server:``
in every log line) and, for a socket bound to one IP, its local address, so a
session needs no ``getsockname`` to match routes.  Listener kinds (TLS, PROXY
protocol) differ only in the phases they put before the common ones.  Every
listener of a process shares one ``overload.Gate``: at ``max_connections``
open sessions they all stop accepting (clients wait in the backlog), and an
accept that fails for want of descriptors pauses them instead of spinning.
"""

import errno
import socket
import sys
from functools import partial

import gevent.socket
from gevent.server import StreamServer

from gproxy.proxy.accept import proxyproto, tls
from gproxy.proxy.accept.overload import Gate, out_of_fds
from gproxy.proxy.netio import RawSocket

BACKLOG = 1024


def plain_ip(ip):
    """``::ffff:1.2.3.4`` (an IPv4 client on a dual-stack socket) as ``1.2.3.4``."""
    return ip[7:] if ip.startswith("::ffff:") and "." in ip else ip


def addr_text(host, port):
    """``host:port`` as nginx prints a listen address (IPv6 bracketed)."""
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


def bind_listener(host, port, backlog=BACKLOG, reuseport=False):
    """A bound, listening gevent socket (a TLS wrapper can sit on it).

    TCP_NODELAY is set here once: accepted sockets inherit it on Linux, and
    every session wants it (nginx's ``tcp_nodelay``, on by default).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = gevent.socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def listener_phases(tls_on=False, proxy_protocol=False, to_upstream=False, pp_version=1):
    """A listener kind's own phases, in APISIX's order: the PROXY header comes
    first on the wire, then the TLS handshake; the header for the node is
    prepared once the client's address is known."""
    phases = []
    if proxy_protocol:
        phases.append(proxyproto.read_header)
    if tls_on:
        phases.append(tls.tls_handshake)
    if to_upstream:
        phases.append(proxyproto.upstream_header(pp_version))
    return tuple(phases)


class PlainStreamServer(StreamServer):
    """A StreamServer whose handler gets a plain non-blocking socket, not a gevent one,
    and that accepts only while its gate is open.

    The handler owns the socket it is given: the server does not close it when
    the handler returns (a session hands its socket on to the relay).

    One readiness event of the listening socket accepts at most
    ``max_accept`` clients, each handed straight to ``spawn(handle, sock,
    address)`` (gevent's own loop adds three Python calls a client).  Every
    accepted client starts its session in the same loop iteration (on
    loopback a whole set-up often runs without a pause), so this bounds how
    long one burst holds the hub: the rest of the backlog waits for the next
    iteration, after timers and other sockets had their turn.
    """

    gate = None
    max_accept = 8

    def do_close(self, *args):
        pass  # the session closes its socket, or gives it to the relay

    def _do_read(self):
        gate, listening = self.gate, self.socket
        accept, spawn, handle = listening._accept, self._spawn, self._handle
        family, kind, proto = listening.family, listening.type, listening.proto
        for _ in range(self.max_accept):
            if gate.full():
                gate.pause()  # stops this watcher too: the backlog holds the rest
                return
            try:
                fd, address = accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if out_of_fds(exc):
                    gate.out_of_fds(exc, "accept4()")
                    return
                if exc.errno in _CLIENT_GONE:
                    continue  # that client left before we took it: the next one
                return self._back_off()
            gate.enter()
            if self.delay != self.min_delay:
                self.delay = self.min_delay  # accepting again: the next error waits little
            sock = RawSocket(family, kind, proto, fd)
            sock.setblocking(False)
            spawn(handle, sock, address)

    def _back_off(self):
        """An unexpected accept error: report it, then wait before accepting again
        (gevent's own policy: 10 ms doubling up to a second), never spin."""
        self.loop.handle_error(self, *sys.exc_info())
        self.stop_accepting()
        self._timer = self.loop.timer(self.delay)
        self._timer.start(self._start_accepting_if_started)
        self.delay = min(self.max_delay, self.delay * 2)


#: accept(2) errors about the one client being taken, not the listener (Linux
#: passes the pending network errors of the new socket on to accept).
_CLIENT_GONE = frozenset((errno.ECONNABORTED, errno.EPROTO, errno.ENETDOWN, errno.ENOPROTOOPT,
                          errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH, errno.EOPNOTSUPP,
                          errno.ENETUNREACH, errno.EPERM))


class Listener:
    """One bound address and how its sessions start.

    ``pipeline`` is what every session accepted here runs, in order: the
    listener's own phases (PROXY header, TLS handshake), then the common
    ones (route match onwards), which the session room composes and this
    room never imports; ``spec`` is the config entry it came from.
    """

    def __init__(self, sock, spec=None, pipeline=(), gate=None):
        self.sock = sock
        self.spec = spec
        self.pipeline = tuple(pipeline)
        self.gate = gate if gate is not None else Gate()
        host, port = sock.getsockname()[:2]
        self.text = addr_text(host, port)  # nginx's "server:" in log lines
        self.wildcard = host in ("0.0.0.0", "::")
        self.local = None if self.wildcard else (plain_ip(host), port)
        self.server = None

    @property
    def address(self):
        return self.sock.getsockname()[:2]

    def serve(self, handle, spawn):
        """Accept on the hub; ``handle(listener, sock, addr)`` runs per client via ``spawn``.

        The handler must call ``listener.gate.leave()`` once the session ends.
        """
        self.server = PlainStreamServer(self.sock, partial(handle, self), spawn=spawn)
        self.server.gate = self.gate
        self.gate.servers.append(self.server)
        self.server.start()
        if self.gate.paused:
            self.server.stop_accepting()

    def close(self):
        """Stop accepting (the socket closes); sessions already accepted go on."""
        if self.server is not None:
            if self.server in self.gate.servers:
                self.gate.servers.remove(self.server)
            self.server.close()

    def stop(self):
        if self.server is not None:
            self.server.stop(timeout=0)
