"""The HTTP listeners' server: pywsgi on the proxy's hub, capped and with timeouts,
over HTTP or, for the Admin API with APISIX's ``deployment.admin.https_admin``,
HTTPS (and client certificates when ``admin_api_mtls.admin_ssl_ca_cert`` is set).

Used for the Admin API and, by the runtime, for the control API and the
metrics.  Each listener serves at most ``max_connections`` clients at once
(more wait in the kernel's backlog) and drops a client that takes longer
than ``timeout`` seconds to send a request line or headers, or sits idle
that long between requests, so a slow or greedy HTTP client can never take
the file descriptors the data path needs.
"""

import errno
import logging
import socket
import time

import gevent
from gevent import ssl as gssl
from gevent.pool import Pool
from gevent.pywsgi import WSGIServer

log = logging.getLogger("gproxy.admin")
HANDSHAKE_TIMEOUT = 60.0
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
    """pywsgi with a connection cap, socket timeouts and TCP_NODELAY: a
    response's headers and body go out in two writes, and without it Nagle
    holds the body for the client's delayed ACK (~40 ms per kept-alive request)."""

    def __init__(self, listener, application, max_connections=64, timeout=30.0, **kwargs):
        super().__init__(listener, application, spawn=Pool(max_connections), **kwargs)
        self.timeout = timeout
        self._next_report = 0.0

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

    def handle(self, sock, address):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        sock.settimeout(self.timeout)  # request line, headers, and idle keep-alive
        super().handle(sock, address)

    def wrap_socket_and_handle(self, client_socket, address):
        """HTTPS: a failed or stalled handshake is one info line, not a traceback."""
        client_socket.settimeout(min(self.timeout, HANDSHAKE_TIMEOUT))
        try:
            ssl_socket = self.wrap_socket(client_socket, **self.ssl_args)
        except (OSError, ValueError) as exc:
            log.info("admin: TLS handshake with %s failed: %s", address[0], exc)
            client_socket.close()
            return None
        try:
            return self.handle(ssl_socket, address)
        finally:
            ssl_socket.close()
