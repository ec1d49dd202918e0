"""Exceptions shared by gproxy's pure modules.

Each carries the message that is logged or returned to the user verbatim, so
the wording (often APISIX's own) lives where the error is raised.
"""


class GproxyError(Exception):
    """Base class for every error gproxy raises on purpose."""


class MalformedPacket(GproxyError):
    """The client's first packet cannot be a CONNECT we accept.

    ``str(exc)`` is the log line, in APISIX's wording where APISIX has one.
    ``reason`` is a short stable token for counters (``malformed``,
    ``too_large``, ``protocol_name``, ``protocol_level``, ...).
    """

    def __init__(self, message, reason="malformed"):
        super().__init__(message)
        self.reason = reason


class ConfigError(GproxyError):
    """conf/config.yaml is invalid; the message names the key."""


class SchemaError(GproxyError):
    """A stream route or upstream failed validation (APISIX's wording)."""


class NoUpstream(GproxyError):
    """No node can be chosen for a session; the message is the log line."""


class Reject(GproxyError):
    """A session phase refuses the client: counted under ``reason``, logged at ``level``.

    ``str(exc)`` is the log line (APISIX's wording where it has one);
    ``status`` the refusing plugin's code for the access log's ``$status``
    (None: the access log's table by reason decides).
    """

    def __init__(self, reason, level, message, *args, status=None):
        super().__init__(message % args if args else message)
        self.reason = reason
        self.level = level
        self.status = status


class StoreUnavailable(GproxyError, OSError):
    """The store cannot be reached (etcd down); ``str(exc)`` is APISIX's message.

    An OSError, so a store that cannot load at start-up is reported like an
    unreadable file; the Admin API answers it with 503 ``{"error_msg": ...}``.
    """


class NotApplied(GproxyError):
    """A change is stored but a worker could not make it live (``--workers``); the
    message names the worker.  The Admin API answers 503 with it."""


class HandshakeError(GproxyError):
    """A WebSocket upgrade request gproxy refuses (RFC 6455 §4.2.1-4.2.2).

    ``status`` is the HTTP status to answer with, ``headers`` extra response
    header lines (``Sec-WebSocket-Version: 13`` for a 426), ``reason`` a
    short token for counters; ``str(exc)`` is the log line.
    """

    def __init__(self, status, message, reason="ws_bad_request", headers=()):
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.headers = tuple(headers)


class FrameError(GproxyError):
    """A WebSocket frame stream gproxy must fail (RFC 6455 §7.1.7).

    ``code`` is the close status to send (§7.4.1: 1002 protocol error, 1003
    unsupported data, 1007 invalid payload, 1009 too big); ``events`` are the
    events parsed before the error, in order; ``str(exc)`` is the log line.
    """

    def __init__(self, code, message, reason="ws_protocol_error"):
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.events = []


class MalformedHeader(GproxyError):
    """A PROXY protocol header (or a TLS ClientHello) gproxy cannot accept."""


class ProxyStopped(GproxyError, RuntimeError):
    """An embedded gproxy's handle can no longer reach it: stopped, its process
    gone, or the handle was inherited by a forked child of the program that
    started it.  ``str(exc)`` says which."""


class HandoverError(GproxyError):
    """A live upgrade's handover cannot go on; ``str(exc)`` says why (logged by the
    caller).  The old process keeps (or takes back) every session and listener."""
