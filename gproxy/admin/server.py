"""The HTTP listeners' server: pywsgi on the proxy's hub, capped and with timeouts.

Used for the Admin API and, by the runtime, for the control API and the
metrics.  Each listener serves at most ``max_connections`` clients at once
(more wait in the kernel's backlog) and drops a client that takes longer
than ``timeout`` seconds to send a request line or headers, or sits idle
that long between requests, so a slow or greedy HTTP client can never take
the file descriptors the data path needs.
"""

import socket

from gevent.pool import Pool
from gevent.pywsgi import WSGIServer


class AdminServer(WSGIServer):
    """pywsgi with a connection cap, socket timeouts and TCP_NODELAY: a
    response's headers and body go out in two writes, and without it Nagle
    holds the body for the client's delayed ACK (~40 ms per kept-alive request)."""

    def __init__(self, listener, application, max_connections=64, timeout=30.0, **kwargs):
        super().__init__(listener, application, spawn=Pool(max_connections), **kwargs)
        self.timeout = timeout

    def handle(self, sock, address):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        sock.settimeout(self.timeout)  # request line, headers, and idle keep-alive
        super().handle(sock, address)
