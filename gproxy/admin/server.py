"""The HTTP listeners' server: pywsgi on the proxy's hub, over HTTP or, for the
Admin API with APISIX's ``deployment.admin.https_admin``, HTTPS (and client
certificates when ``admin_api_mtls.admin_ssl_ca_cert`` is set).

Used for the Admin API and, by the runtime, for the control API and the
metrics.  Each listener keeps at most ``max_connections`` connections open
and never lets idle or slow clients deny it: ``conns.Conns`` gives every
connection a deadline for its state (``timeout`` to start a request,
``request_timeout`` to send one whole or take its response) and, at the cap,
closes an idle or slow connection of the busiest client to make room for a
new one, so a fresh request is answered promptly under thousands of idle or
slowloris connections.  ``handler.Handler`` walks each request through those
states.  Connections gproxy closes are counted, per listener and reason, in
one log line a second (``tally.CloseTally``); none writes a traceback.
"""

import errno
import logging
import socket
import time

import gevent
from gevent import ssl as gssl
from gevent.pool import Group
from gevent.pywsgi import WSGIServer

from gproxy.admin.conns import READING, Conns
from gproxy.admin.handler import Handler
from gproxy.admin.tally import CloseTally

log = logging.getLogger("gproxy.admin")
#: accept() failing for want of descriptors: pause, as nginx does, rather than retry at once.
_FD_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_FD_PAUSE = 0.5


def https_context(cert, key, ca=None):
    """gevent's cooperative SSLContext for the admin listener (cert/key/ca are paths)."""
    ctx = gssl.SSLContext(gssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = gssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    if ca:
        ctx.load_verify_locations(cafile=ca)
        ctx.verify_mode = gssl.CERT_REQUIRED  # nginx: ssl_verify_client on
    return ctx


class AdminServer(WSGIServer):
    """pywsgi with a table of connections (see the module docstring) and
    TCP_NODELAY: a response's headers and body go out in two writes, and
    without it Nagle holds the body for the client's delayed ACK (~40 ms
    per kept-alive request).  ``name`` labels its summary lines."""

    handler_class = Handler
    #: The kernel's accept queue (gevent's default is 128).  A flood fills it
    #: between two turns of the loop, and a full queue drops the SYN of every
    #: new client, a fresh request's too, for a 1 s retransmit; nginx uses 511.
    backlog = 1024

    def __init__(self, listener, application, max_connections=64, timeout=30.0,
                 request_timeout=10.0, name="admin", tally=None, max_body=None, **kwargs):
        self._group = Group()
        super().__init__(listener, application, spawn=self._group.spawn, **kwargs)
        self.name = name
        self.conns = Conns(self.loop, max_connections, timeout, request_timeout,
                           on_room=self._room, on_drop=self._dropped)
        # At most a quarter of the cap per turn of the loop: a request accepted
        # in one turn has its greenlet read it before the cap can come round to it.
        self.max_accept = max(1, min(100, max_connections // 4))
        self.tally = tally if tally is not None else CloseTally(self.loop)
        if max_body is not None:
            self.handler_class = type("Handler", (Handler,), {"max_body": max_body})
        self._next_report = 0.0

    def configure(self, max_connections, timeout, request_timeout):
        """New cap and timeouts, applied in place (SIGHUP)."""
        self.max_accept = max(1, min(100, max_connections // 4))
        self.conns.configure(max_connections, timeout, request_timeout)

    def full(self):
        return self.conns.full()

    def _room(self):
        if self.started and not self.closed:
            self.start_accepting()

    def do_read(self):
        try:
            return super().do_read()
        except OSError as exc:
            if exc.errno not in _FD_ERRNOS:
                raise
            failure = exc
        now = time.monotonic()
        if now >= self._next_report:  # once a second at most
            self._next_report = now + 1.0
            log.critical("accept4() failed (%d: %s) on an HTTP listener", failure.errno,
                         failure.strerror)
        self.stop_accepting()
        gevent.spawn_later(_FD_PAUSE, self._resume)
        return None

    def _resume(self):
        if not self.closed:
            self.start_accepting()

    def do_handle(self, sock, address):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        # A backstop only: every state has its own deadline, shorter than this.
        sock.settimeout(max(self.conns.idle, self.conns.request) + 1.0)
        conn = self.conns.admit(sock, address)
        if conn.state == READING:
            self._spawn(self._serve, conn)
        else:  # nothing to read yet: a bare watcher until bytes come, not a greenlet, so
            conn.watcher = self.loop.io(conn.fd, 1)  # an idle flood costs little
            conn.watcher.start(self._wake, conn)

    def _wake(self, conn):
        conn.watcher.stop()
        conn.watcher = None
        self._spawn(self._serve, conn)

    def _dropped(self, conn):
        """Close a dropped connection no greenlet serves yet, now; True if it was one."""
        if conn.watcher is None:
            return False
        conn.watcher.stop()
        conn.watcher = None
        self._finish(conn)
        return True

    def _serve(self, conn):
        try:
            sock = self._handshake(conn) if self.ssl_enabled else conn.sock
            if sock is not None and not conn.dropped:
                handler = self.handler_class(sock, conn.address, self)
                handler.conn = conn
                handler.handle()
        finally:
            self._finish(conn)

    def _finish(self, conn):
        self.conns.release(conn)
        if conn.reason is not None and conn.reason != "stopping":
            self.tally.note(self.name, conn.reason, conn.client)
        try:
            conn.sock.close()
        except OSError:
            pass

    def _handshake(self, conn):
        """HTTPS: the TLS handshake, within the request's deadline once bytes come."""
        try:
            if conn.state != READING:
                conn.sock.recv(1, socket.MSG_PEEK)  # waiting: the idle deadline runs
                conn.enter(READING)
            if conn.dropped:
                return None
            conn.sock = self.wrap_socket(conn.sock, **self.ssl_args)  # detaches the TCP one
            return conn.sock
        except (OSError, ValueError):
            if not conn.dropped:
                conn.reason = "tls_handshake"
            return None

    def stop(self, timeout=None):
        """Close the listener, shut idle and slow connections, give busy ones ``timeout``."""
        self.close()
        self.conns.drop_all()
        self._group.join(timeout=self.stop_timeout if timeout is None else timeout)
        self._group.kill(block=True, timeout=1)
        self.tally.flush()

