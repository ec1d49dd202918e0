"""TLS contexts built from the ``ssls`` resource and upstream ``tls`` settings.

``Certificates`` is one snapshot of the ssl objects (swapped whole, like the
route table, so a new certificate serves the next handshake and live
sessions are untouched).  It builds an OpenSSL context per ssl object the
first time a client asks for one of its names, and keeps it while the object
is unchanged, across snapshots.  PEM text reaches OpenSSL through an
anonymous in-memory file (``memfd``): private keys never touch a disk here.
Contexts refuse renegotiation (a relay's write must never need a read) and
TLS below 1.2 unless an ssl object's ``ssl_protocols`` asks for it.
"""

import contextlib
import logging
import os
import ssl
import tempfile

from gproxy.model.ssls import CertIndex

log = logging.getLogger("gproxy.tls")

_VERSIONS = {"TLSv1.1": ssl.TLSVersion.TLSv1_1, "TLSv1.2": ssl.TLSVersion.TLSv1_2,
             "TLSv1.3": ssl.TLSVersion.TLSv1_3}
#: The SNI gproxy sends to a ``scheme: tls`` node when the client sent none:
#: APISIX's ``$upstream_sni`` default.
DEFAULT_UPSTREAM_SNI = "apisix_backend"


class CertError(Exception):
    """An ssl object whose PEM OpenSSL refuses; the message names the object."""


@contextlib.contextmanager
def pem_path(text):
    """A path OpenSSL can open that holds ``text``: a memfd, or a private temp file."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("gproxy-pem", os.MFD_CLOEXEC)
        try:
            os.write(fd, text.encode())
            yield "/proc/self/fd/%d" % fd
        finally:
            os.close(fd)
        return
    fd, path = tempfile.mkstemp(prefix="gproxy-pem-")  # 0600
    try:
        os.write(fd, text.encode())
        os.close(fd)
        yield path
    finally:
        os.unlink(path)


def _load_pair(ctx, cert, key):
    with pem_path(cert.strip() + "\n" + key.strip() + "\n") as path:
        ctx.load_cert_chain(path)


def _base(purpose):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if purpose == "server"
                         else ssl.PROTOCOL_TLS_CLIENT)
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def server_context(conf):
    """The context serving one ssl object: its certificates, optional client CA."""
    ctx = _base("server")
    try:
        _load_pair(ctx, conf["cert"], conf["key"])
        for cert, key in zip(conf.get("certs") or (), conf.get("keys") or ()):
            _load_pair(ctx, cert, key)  # e.g. an ECDSA certificate next to an RSA one
        client = conf.get("client")
        if client:
            ctx.load_verify_locations(cadata=client["ca"])
            ctx.verify_mode = ssl.CERT_REQUIRED  # stream: rejected in the handshake (APISIX)
    except (ssl.SSLError, ValueError, OSError) as exc:
        raise CertError("ssl %s: %s" % (conf.get("id"), exc)) from None
    protocols = [_VERSIONS[p] for p in conf.get("ssl_protocols") or () if p in _VERSIONS]
    if protocols:
        ctx.minimum_version, ctx.maximum_version = min(protocols), max(protocols)
    return ctx


def _fingerprint(conf, *fields):
    return tuple(repr(conf.get(f)) for f in fields)


class Certificates:
    """One snapshot of the ssl objects and the contexts built for them so far."""

    def __init__(self, ssls=(), trusted_ca="system", previous=None):
        self.index = CertIndex(ssls)
        self.trusted_ca = trusted_ca
        old = previous._servers if previous is not None else {}
        self._servers = {}  # ssl id -> (fingerprint, context, the conf it was checked for)
        for conf in ssls:
            key = str(conf.get("id"))
            fingerprint = self._server_print(conf)
            if key in old and old[key][0] == fingerprint:  # unchanged: keep the built context,
                self._servers[key] = (fingerprint, old[key][1], conf)  # checked for this conf
        self._clients = previous._clients if previous is not None and \
            previous.trusted_ca == trusted_ca else {}

    @staticmethod
    def _server_print(conf):
        return _fingerprint(conf, "cert", "key", "certs", "keys", "client", "ssl_protocols")

    def server(self, conf):
        """The server context for an ssl object (built on first use); CertError if bad."""
        key = str(conf.get("id"))
        entry = self._servers.get(key)
        if entry is not None and entry[2] is conf:
            return entry[1]  # this snapshot's object: no need to compare PEM text
        fingerprint = self._server_print(conf)
        if entry is None or entry[0] != fingerprint:
            entry = (fingerprint, server_context(conf), conf)
        else:
            entry = (fingerprint, entry[1], conf)
        self._servers[key] = entry
        return entry[1]

    def client(self, tls_conf, check_hostname):
        """The context dialling a ``scheme: tls`` node with an upstream's ``tls`` settings."""
        cert, key = tls_conf.get("client_cert"), tls_conf.get("client_key")
        cert_id = tls_conf.get("client_cert_id")
        if cert_id is not None:  # APISIX: an ssl object of type client
            found = self.index.by_id.get(str(cert_id))
            if found is None or found.get("type") != "client":
                raise CertError("failed to find upstream ssl object for client_cert_id %s"
                                % cert_id)
            cert, key = found["cert"], found["key"]
        verify = bool(tls_conf.get("verify"))
        cache_key = (cert, key, verify, verify and check_hostname)
        ctx = self._clients.get(cache_key)
        if ctx is None:
            ctx = self._client_context(cert, key, verify, check_hostname)
            if len(self._clients) > 256:
                self._clients.clear()
            self._clients[cache_key] = ctx
        return ctx

    def _client_context(self, cert, key, verify, check_hostname):
        ctx = _base("client")
        ctx.check_hostname = verify and check_hostname
        ctx.verify_mode = ssl.CERT_REQUIRED if verify else ssl.CERT_NONE
        try:
            if verify:
                if self.trusted_ca in (None, "", "system"):
                    ctx.load_default_certs()
                else:
                    ctx.load_verify_locations(cafile=self.trusted_ca)
            if cert and key:
                _load_pair(ctx, cert, key)
        except (ssl.SSLError, ValueError, OSError) as exc:
            raise CertError("upstream tls: %s" % exc) from None
        return ctx


def refusal_context():
    """A context with no certificate: a handshake on it ends in a TLS alert,
    which tells a client "no certificate for that name" better than a bare close."""
    return _base("server")
