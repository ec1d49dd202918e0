"""The admin listener: pywsgi serving the Admin API app on the proxy's hub."""

import socket

from gevent.pywsgi import WSGIServer


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
