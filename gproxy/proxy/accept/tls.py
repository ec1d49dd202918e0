"""TLS on the data path: a TLS listener's handshake phase, ``scheme: tls``
dialling, and the endpoint the relay drives once a handshake is done.

The handshake phase does what APISIX does in its ``ssl_client_hello`` and
``ssl_certificate`` phases (``apisix/init.lua``, ``ssl/router/radixtree_sni``):
read the server name from the ClientHello (peeked, not consumed), pick the
ssl object for it (``Certificates``), then let OpenSSL handshake on the
socket with that object's context, cooperatively, bounded by
``gproxy.tls.handshake_timeout``.  A client certificate, when the ssl object
has ``client.ca``, is checked in the handshake and its subject CN becomes the
``tls_client_cn`` variable.  The session's client endpoint is then a
``TlsEndpoint``: non-blocking ``recv_into``/``send`` that raise
BlockingIOError for "not now", plus ``pending()``.

OpenSSL is reached through ``_ssl``'s C-level socket wrapper on the C-level
socket the session already uses, so this works the same with or without
gevent's monkey-patching.
"""

import logging
import re
import socket
import ssl
import time

from gevent.socket import wait_read, wait_write

from gproxy.errors import MalformedHeader, Reject
from gproxy.protocols import tlshello
from gproxy.proxy import netio
from gproxy.proxy.accept.tlsctx import DEFAULT_UPSTREAM_SNI, CertError, refusal_context

HANDSHAKING = "SSL handshaking"  # nginx's log actions
UPSTREAM_HANDSHAKING = "SSL handshaking to upstream"
NO_SNI = ("failed to find SNI: please check if the client requests via IP or uses an "
          "outdated protocol. If you need to report an issue, provide a packet capture "
          "file of the TLS handshake.")
#: nginx finalizes a stream session whose handshake failed (timeouts too) with 500.
HANDSHAKE_FAILED = 500
_FULL_RECORD = 16384  # a read this big suggests more records are waiting
_TIMEOUT = socket.timeout("timed out")
_EOF = (ssl.SSLZeroReturnError, ssl.SSLEOFError)
_REFUSAL = refusal_context()


class TlsEndpoint:
    """A TLS connection over a C-level socket, shaped like one for the relay.

    Half-closing (``shutdown(SHUT_WR)``) closes the TCP write side only: a
    TLS close_notify there would make OpenSSL read, and could eat bytes the
    other direction is still relaying.  ``close()`` sends close_notify first.
    """

    __slots__ = ("sock", "ssl")

    def __init__(self, sock, sslobj):
        self.sock = sock  # held here: the C wrapper keeps only a weak reference
        self.ssl = sslobj

    def recv_into(self, buf, nbytes=0):
        want = nbytes or len(buf)
        n = self._read(want, buf)
        view = None
        while n and n < want and n % _FULL_RECORD == 0:  # bulk: take what else is there
            view = view or memoryview(buf)
            try:
                more = self._read(want - n, view[n:])
            except BlockingIOError:
                break
            if not more:
                break
            n += more
        return n

    def _read(self, size, buf):
        try:
            return self.ssl.read(size, buf)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise BlockingIOError() from None
        except _EOF:
            return 0

    def recv(self, size):
        buf = bytearray(size)
        return bytes(buf[:self.recv_into(buf)])

    def send(self, data):
        try:
            return self.ssl.write(data)
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
            raise BlockingIOError() from None

    def pending(self):
        return self.ssl.pending()

    def getpeercert(self):
        return self.ssl.getpeercert()

    def fileno(self):
        return self.sock.fileno()

    def shutdown(self, how):
        self.sock.shutdown(how)

    def close(self):
        if self.sock.fileno() >= 0:
            try:
                self.ssl.shutdown()  # close_notify; not waiting for the peer's
            except (OSError, ValueError):
                pass
        self.sock.close()


def handshake(endpoint, deadline):
    """Drive ``do_handshake`` on the hub until done; socket.timeout past ``deadline``."""
    fd = endpoint.fileno()
    while True:
        try:
            endpoint.ssl.do_handshake()
            return
        except ssl.SSLWantReadError:
            wait = wait_read
        except ssl.SSLWantWriteError:
            wait = wait_write
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _TIMEOUT
        wait(fd, remaining, _TIMEOUT)


def _ssl_error(exc):
    """nginx's line for a failed handshake, with OpenSSL's words (no ``_ssl.c`` noise)."""
    text = re.sub(r"^\[SSL: [A-Z0-9_]+\] ", "", getattr(exc, "strerror", None) or str(exc))
    return "SSL_do_handshake() failed (SSL: %s)" % re.sub(r" \(_ssl\.c:\d+\)$", "", text)


# -- the listener's phase --------------------------------------------------------

def tls_handshake(s):
    """A TLS listener's phase: choose the certificate by SNI, handshake, set ``s.sni``."""
    s.action = HANDSHAKING
    settings = s.settings
    deadline = time.monotonic() + settings.tls_handshake_timeout
    hello = _client_hello(s, deadline)
    s.sock = raw = netio.adopt_weak(s.sock)  # _ssl needs a weakly referenceable socket
    sni = hello.server_name or settings.fallback_sni
    if not sni:
        _refuse(s)
        raise Reject("tls_no_sni", logging.ERROR, NO_SNI)
    certs = s.proxy.certs
    conf = certs.index.match(sni)
    if conf is None:
        _refuse(s)
        raise Reject("tls_no_certificate", logging.ERROR,
                     "failed to find any SSL certificate by SNI: %s", sni)
    try:
        ctx = certs.server(conf)
    except CertError as exc:
        _refuse(s)
        raise Reject("tls_certificate", logging.ERROR, "failed to fetch ssl config: %s", exc)
    s.sock = endpoint = TlsEndpoint(raw, ctx._wrap_socket(raw, True, None))
    try:
        handshake(endpoint, deadline)
    except socket.timeout:
        raise Reject("timeout", logging.INFO, "client timed out", status=HANDSHAKE_FAILED) from None
    except ssl.SSLError as exc:
        raise Reject("tls_handshake", logging.INFO, _ssl_error(exc)) from None
    s.sni = s.info.sni = sni
    if conf.get("client"):
        cn = _common_name(endpoint.getpeercert())
        if cn:
            s.vars["tls_client_cn"] = s.info.tls_client_cn = cn


def _client_hello(s, deadline):
    buf, limit = b"", s.settings.max_packet
    try:
        while True:
            hello = tlshello.parse(buf, limit)
            if hello is not None:
                return hello
            want = tlshello.wanted(buf)
            buf = netio.peek(s.sock, want, deadline)
            if len(buf) < want:
                raise Reject("closed", logging.INFO, "peer closed connection in SSL handshake",
                             status=HANDSHAKE_FAILED)
    except MalformedHeader as exc:
        raise Reject("tls_handshake", logging.INFO, _ssl_error(exc)) from None
    except socket.timeout:
        raise Reject("timeout", logging.INFO, "client timed out", status=HANDSHAKE_FAILED) from None


def _refuse(s):
    """Answer the ClientHello (already waiting) with a TLS alert instead of a bare close."""
    try:
        _REFUSAL._wrap_socket(s.sock, True, None).do_handshake()
    except (OSError, ValueError):
        pass


def _common_name(cert):
    for rdn in (cert or {}).get("subject", ()):
        for name, value in rdn:
            if name == "commonName":
                return value
    return None


# -- dialling a scheme: tls node ---------------------------------------------------

class UpstreamTlsError(OSError):
    """A TLS handshake with a node failed (and was logged)."""


def connect(s, upstream, node, sock, timeout):
    """TLS over a node's fresh connection ``sock``; returns the endpoint.

    SNI: the client's when it sent one, else the node's domain, else APISIX's
    ``apisix_backend``.  With ``tls.verify`` the broker's chain is checked
    against ``apisix.ssl.ssl_trusted_certificate``, and its name against the
    SNI sent unless that is the placeholder.
    """
    name = s.sni or node.domain or DEFAULT_UPSTREAM_SNI
    try:
        ctx = s.proxy.certs.client(upstream.tls, name != DEFAULT_UPSTREAM_SNI)
    except CertError as exc:
        s.log(logging.ERROR, "failed to set upstream tls: %s", exc)
        raise UpstreamTlsError(str(exc)) from None
    endpoint = TlsEndpoint(sock, ctx._wrap_socket(sock, False, name))
    action, s.action = s.action, UPSTREAM_HANDSHAKING
    try:
        handshake(endpoint, time.monotonic() + timeout)
    except ssl.SSLError as exc:
        s.log(logging.ERROR, "%s", _ssl_error(exc))
        raise UpstreamTlsError(_ssl_error(exc)) from None
    finally:
        s.action = action
    return endpoint
