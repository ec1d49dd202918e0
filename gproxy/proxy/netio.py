"""Cooperative I/O on plain (C-level) non-blocking sockets, for the session's hot path
(and the cooperative name lookup of domain nodes).

gevent's socket objects are convenient but cost a wrapper object, watchers and
a few syscalls each; a session only needs a handful of blocking-style calls
before it hands its two descriptors to the relay.  These helpers try the
non-blocking call first and park the greenlet on the hub only when the kernel
says "would block", so the common case (the CONNECT already arrived, the
broker on loopback) takes no extra wake-up.  Nothing here patches anything.
"""

import _socket
import errno
import os
import socket
import time

import gevent
from gevent import socket as gsocket
from gevent.socket import wait_read, wait_write

from gproxy.model.balancer import Node
from gproxy.model.routes import is_ip

_TIMEOUT = socket.timeout("timed out")
_DNS_TIMEOUT = socket.timeout("resolving timed out")
_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0)
#: The C socket type: no Python-level wrapper, and untouched by gevent's
#: monkey-patching (which replaces ``socket.socket`` in the CLI process).
RawSocket = _socket.socket


class WeakSocket(_socket.socket):
    """A C-level socket that can be weakly referenced, as ``_ssl`` needs."""

    __slots__ = ("__weakref__",)


def adopt_weak(sock):
    """``sock``'s descriptor in a non-blocking WeakSocket (``sock`` is left empty).

    Non-blocking matters twice over: a socket object made from a descriptor
    starts in blocking mode, and ``_ssl`` then waits in poll(2) itself,
    holding the hub, instead of raising "want read".
    """
    new = WeakSocket(sock.family, sock.type, sock.proto, sock.detach())
    new.setblocking(False)
    return new


def recv(sock, size, deadline):
    """Up to ``size`` bytes; ``b""`` at EOF; socket.timeout past ``deadline`` (monotonic)."""
    while True:
        try:
            return sock.recv(size)
        except BlockingIOError:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _TIMEOUT from None
            wait_read(sock.fileno(), remaining, _TIMEOUT)


def peek(sock, want, deadline):
    """The first ``want`` bytes waiting on ``sock``, left unread; fewer only at EOF.

    For reading a PROXY header or a ClientHello without taking a byte past
    it.  While fewer are there, SO_RCVLOWAT makes the kernel report the
    socket readable only once ``want`` bytes (or EOF) arrived, so waiting for
    the rest costs no busy loop.  Two wake-ups that bring nothing new mean EOF.
    """
    fd = sock.fileno()
    seen, stalls, lowat = -1, 0, False
    try:
        while True:
            try:
                data = sock.recv(want, socket.MSG_PEEK)
            except BlockingIOError:
                data = None
            if data is not None:
                if len(data) >= want or not data:
                    return data
                stalls = stalls + 1 if len(data) == seen else 0
                if stalls >= 2:
                    return data  # the peer sent FIN after a partial header
                seen = len(data)
                if not lowat:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, want)
                    lowat = True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _TIMEOUT
            wait_read(fd, remaining, _TIMEOUT)
    finally:
        if lowat:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)


def recv_exact(sock, size, deadline):
    """Exactly ``size`` bytes (already peeked, so normally one call)."""
    out = b""
    while len(out) < size:
        chunk = recv(sock, size - len(out), deadline)
        if not chunk:
            raise ConnectionResetError(errno.ECONNRESET, "connection closed")
        out += chunk
    return out


def sendall(sock, data, timeout=None):
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view):]
        except BlockingIOError:
            wait_write(sock.fileno(), timeout, _TIMEOUT)


def _connected(sock):
    """True if a connect that said EINPROGRESS has in fact completed.

    On loopback and other fast paths the kernel finishes the handshake inside
    connect(2) yet still answers EINPROGRESS; asking for the peer (one cheap
    call) then spares a trip through the event loop.
    """
    try:
        sock.getpeername()
    except OSError:
        return False  # ENOTCONN: still connecting (or failed: SO_ERROR says which)
    return True


def connect(host, port, timeout):
    """A connected non-blocking socket, or the OSError that stopped it (also
    when no socket could be made: EMFILE and friends)."""
    try:
        sock = RawSocket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                         socket.SOCK_STREAM | _NONBLOCK)  # non-blocking without an ioctl
    except OSError as exc:
        return exc
    if not _NONBLOCK:
        sock.setblocking(False)
    try:
        err = sock.connect_ex((host, port))
        if err == errno.EINPROGRESS:
            if _connected(sock):
                err = 0
            else:
                wait_write(sock.fileno(), timeout, _TIMEOUT)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as nginx's tcp_nodelay
    except OSError as exc:
        sock.close()
        return exc
    return sock


def resolve_nodes(nodes, on_error=None, timeout=None):
    """Each domain node as a node on its first address (IP nodes as they are);
    a name that does not resolve is dropped after ``on_error(node, exc)``.

    The names are looked up at once, side by side, and ``timeout`` seconds
    bound them all: a name not resolved by then is dropped as failed (a
    ``socket.timeout``), so a resolver that never answers costs a session its
    connect timeout, not the resolver's own retries (``resolv.conf`` allows
    5 s per try and name server).  The lookup itself is gevent's (a thread,
    or c-ares), never on the hub.
    """
    lookups = {id(node): gevent.spawn(gsocket.getaddrinfo, node.host, node.port, 0,
                                      socket.SOCK_STREAM)
               for node in nodes if not is_ip(node.host)}
    gevent.joinall(list(lookups.values()), timeout=timeout)
    out = []
    for node in nodes:
        lookup = lookups.get(id(node))
        if lookup is None:
            out.append(node)
        elif lookup.successful():
            infos = lookup.value
            out.append(Node(infos[0][4][0], node.port, node.weight, node.priority, node.host))
        else:
            lookup.kill(block=False)  # (a thread's lookup runs on, unseen)
            if on_error is not None:
                on_error(node, lookup.exception if lookup.ready() else _DNS_TIMEOUT)
    return out
