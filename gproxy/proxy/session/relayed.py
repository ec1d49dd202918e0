"""A session once it relays: the relay itself, plus what the session's end needs.

``Session`` (session.py) runs the phases in the session's greenlet; at the
hand-off it makes a ``RelayedSession`` and is gone: the greenlet returns and
nothing refers to the ``Session`` any more.  So a live session costs its
record, this relay, its two directions and their watchers, and nothing of
the set-up (the CONNECT bytes, the phases' variables and state): that is
most of what keeps memory per idle session low.

A relayed session is the registry's handle from then on (``close``, ``end``:
an operator's Disconnect, an eviction, a drain, SIGTERM).  When its relay
finishes it gives back what the session held (its accept slot, limit-conn
and least_conn slots), folds its record into the registry's totals and
writes the session's last log line and its access-log line.  It is also
what moves to another process at a live upgrade (session/moved.py;
``adopted`` builds it there).
"""

import logging
import time

from gproxy.protocols.mqttstream import SERVER_SHUTTING_DOWN, disconnect
from gproxy.proxy.relay.relay import Relay

log = logging.getLogger("gproxy.session")
PROXYING = "proxying connection"  # nginx's action while relaying


def log_line(level, info, listener, peer, action, msg, *args):
    """One line in nginx's shape: ``*<n> <msg> while <action>, client: ..., server: ...``."""
    tail = ", client: %s, server: %s" % (info.client_addr, listener.text)
    if peer is not None:
        tail += ', upstream: "%s"' % peer
    action = " while " + action if action else ""
    log.log(level, "*%s " + msg + action + tail, info.seq, *args)


class RelayedSession(Relay):
    """The relay of one session, and the registry's handle for it."""

    __slots__ = ("proxy", "listener", "cleanup", "dialled")

    #: What the access log reads of a session (accesslog.VARIABLES) that a relayed one
    #: has no more: it was not refused, and its CONNECT bytes are in ``bytes_in``.
    refusal = None
    replay = b""

    def __init__(self, s, client, upstream, idle, mqtt):
        super().__init__(s.proxy.relays, client, upstream, s.info, _finished, idle, mqtt,
                         s.replay)
        self.proxy = s.proxy
        self.listener = s.listener
        self.cleanup = s.cleanup or None  # limit-conn, least_conn releases (usually none)
        s.cleanup = None  # they are this object's to run now, with the accept slot
        # Every node dialled, for $upstream_addr: kept only when there was more than one.
        self.dialled = tuple(s.tried) if len(s.tried) > 1 else None

    @classmethod
    def adopted(cls, proxy, listener, client, upstream, info, idle, mqtt, dialled=None):
        """The relay of a session handed over from another process (session.moved:
        its state is loaded next, then it starts)."""
        self = cls.__new__(cls)
        Relay.__init__(self, proxy.relays, client, upstream, info, _finished, idle, mqtt)
        self.proxy = proxy
        self.listener = listener
        self.cleanup = None
        self.dialled = dialled
        return self

    @property
    def tried(self):
        if self.dialled is not None:
            return self.dialled
        return (self.info.node,) if self.info.node else ()

    @property
    def sni(self):
        return self.info.sni

    # -- the registry's handle ---------------------------------------------
    def close(self):
        """Close at once (an operator's Disconnect, or a forced stop)."""
        self.proxy.registry.set_state(self.info, "closing")
        self.abort("disconnected")

    def end(self, code=SERVER_SHUTTING_DOWN, grace=5.0, server_reference=None):
        """End cleanly: at a packet boundary the broker gets a DISCONNECT (so it
        publishes no Will) and an MQTT 5 client one with reason ``code``
        (0x8B server shutting down, 0x9C use another server).  A session not
        on an MQTT route is closed at once."""
        level = self.info.protocol_level
        if level is None:
            return self.close()
        self.proxy.registry.set_state(self.info, "closing")
        client_bye = disconnect(level, code, server_reference) if level == 5 else None
        self.end_at_boundary(disconnect(level), client_bye, grace)


def _finished(relay):
    """The relay finished: release, count, log (the relay's completion callback)."""
    info, proxy = relay.info, relay.proxy
    proxy.registry.remove(info)
    relay.listener.gate.leave()
    cleanup, relay.cleanup = relay.cleanup, None
    for release in cleanup or ():
        release()
    if log.isEnabledFor(logging.INFO):
        log_line(logging.INFO, info, relay.listener, info.node, None,
                 "session closed: node=%s bytes_in=%d bytes_out=%d duration=%.3fs reason=%s",
                 info.node, info.bytes_in, info.bytes_out, time.time() - info.connected_at,
                 relay.reason)
    if proxy.access_log is not None:
        proxy.access_log.session(relay)
