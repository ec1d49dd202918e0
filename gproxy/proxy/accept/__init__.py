"""Accept: what happens between a listener's ``accept`` and a session's first phase.

Bound listeners and their ``StreamServer`` (``listener``), the cap on open
sessions and running out of descriptors (``overload``), reused session
greenlets (``workers``), and a listener's own phases before the common ones:
the PROXY protocol header (``proxyproto``) and the TLS handshake (``tls``,
with the certificate snapshot in ``tlsctx``).
"""
