"""The admin listener: pywsgi serving the Admin API app on the proxy's hub,
over HTTP or, with APISIX's ``deployment.admin.https_admin``, HTTPS (and
client certificates when ``admin_api_mtls.admin_ssl_ca_cert`` is set)."""

import logging
import socket

from gevent import ssl as gssl
from gevent.pywsgi import WSGIServer

log = logging.getLogger("gproxy.admin")
HANDSHAKE_TIMEOUT = 60.0


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
    """pywsgi with TCP_NODELAY: a response's headers and body go out in two
    writes, and without it Nagle holds the body for the client's delayed ACK
    (~40 ms per kept-alive request)."""

    def handle(self, sock, address):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        super().handle(sock, address)

    def wrap_socket_and_handle(self, client_socket, address):
        """HTTPS: a failed or stalled handshake is one info line, not a traceback."""
        client_socket.settimeout(HANDSHAKE_TIMEOUT)
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
