"""One client connection, as a list of phases, up to the hand-off to the relay.

``Proxy.handle(listener, sock, addr)`` is every listener's handler.  It builds
a ``Session`` and runs the listener's own phases (a PROXY protocol header, a
TLS handshake, ...) and then the common ones (``phases.COMMON``: match a
route, find its upstream, preread, dial, replay).  A phase is a plain
function of the session; it refuses the client by raising ``Reject``, which
is counted and logged as one line here.  After the last phase both sockets go
to the relay, which owns and closes them from then on; if anything fails
before that, this module closes what was opened.  Nothing here can touch the
listener.  Log lines keep nginx's shape (``<message> while <action>, client:
<ip>, server: <listen addr>``) and, where APISIX has one, its wording
(docs/apisix-behaviour.md §1-2, §5); CONNECT payloads are never logged.
"""

import logging
import socket
import sys

from gproxy.errors import Reject
from gproxy.model.routes import DEFAULT_PROXY_TIMEOUT, RouteTable
from gproxy.protocols.mqttstream import SERVER_SHUTTING_DOWN
from gproxy.proxy.accept.listener import plain_ip
from gproxy.proxy.accept.tlsctx import Certificates
from gproxy.proxy.relay.direction import shutdown
from gproxy.proxy.relay.hub import RelayHub
from gproxy.proxy.session.limits import Limits
from gproxy.proxy.session.relayed import PROXYING, RelayedSession, log_line
from gproxy.proxy.sessions.registry import Registry
from gproxy.proxy.settings import Settings

log = logging.getLogger("gproxy.session")


class Proxy:
    """The data path shared by every listener: route table, registry, relays, settings."""

    def __init__(self, table=None, registry=None, settings=None, relays=None, certs=None):
        self.limits = Limits()
        self.table = table if table is not None else RouteTable()
        self.certs = certs if certs is not None else Certificates()  # the ssls snapshot
        self.registry = registry if registry is not None else Registry()  # empty is falsy
        self.settings = settings if settings is not None else Settings()
        self.relays = relays if relays is not None else RelayHub()
        self.access_log = None  # an accesslog.AccessLog when the stream access log is on

    def handle(self, listener, sock, addr):
        """One accepted client on ``listener`` (the StreamServer handler)."""
        server = listener.local
        if server is None:  # a wildcard listener: which of our addresses was it?
            try:
                server = sock.getsockname()
            except OSError:
                sock.close()  # the server leaves it to us
                listener.gate.leave()
                return  # the client left before we looked
            server = (plain_ip(server[0]), server[1])
        ip = addr[0]
        if ":" in ip:
            ip = plain_ip(ip)
        # Interned: clients behind one address (NAT, a load generator) share one string.
        info = self.registry.new_session((sys.intern(ip), addr[1]), server)
        Session(self, listener, sock, info).run()


def _bare(exc):
    """``exc`` without its traceback and chained exceptions: their frames hold this
    session (``self``, ``s``), and the session keeps its refusal for the access
    log, a reference cycle the GC policy could freeze for good (runtime/gcpolicy.py)."""
    exc.__traceback__ = exc.__context__ = exc.__cause__ = None
    return exc


class Session:
    """The life of one accepted connection, up to the hand-off to the relay.

    At the hand-off a ``RelayedSession`` (relayed.py) takes over what is left
    to do, and this object is dropped with the session's greenlet.

    Phases read and fill these attributes: ``route``/``upstream`` once
    matched (after ``refine`` when the CONNECT chooses the route), ``replay`` (the bytes to send upstream first: every byte peeked,
    unchanged), ``vars`` (nginx-style variables for hashing: ``mqtt_client_id``
    ...), ``upstream_sock`` once dialled, ``action`` (nginx's ``while ...``).
    """

    __slots__ = ("proxy", "settings", "registry", "table", "listener", "sock", "info", "route",
                 "upstream", "replay", "vars", "connect", "preamble", "upstream_sock", "sni", "ws",
                 "peer", "action", "relay", "tracked", "keep_alive", "cleanup", "tried", "refusal")

    def __init__(self, proxy, listener, sock, info):
        self.proxy = proxy
        self.settings = proxy.settings
        self.registry = proxy.registry
        self.table = proxy.table  # one snapshot for the whole session
        self.listener = listener
        self.sock = sock  # the client endpoint (a TlsEndpoint after a handshake phase)
        self.info = info
        self.route = None
        self.upstream = None
        self.replay = b""
        self.vars = {}
        self.connect = None  # the ConnectPacket, once the preread has read it
        self.preamble = b""  # bytes a node gets before anything else (a PROXY header)
        self.upstream_sock = None
        self.sni = None  # the TLS client's server name, once a handshake phase ran
        self.ws = None  # a WebSocket client's state, once its upgrade was read (wspreread)
        self.peer = None  # the node being dialled, then the one connected
        self.action = None
        self.relay = None
        self.tracked = False
        self.keep_alive = None  # seconds, from the CONNECT (MQTT routes)
        self.cleanup = []  # called once when the session ends (after the accept gate's slot)
        self.tried = []  # every node address dialled, in order (nginx's $upstream_addr)
        self.refusal = None  # the Reject (or OSError) that ended it before the relay

    # -- logging -----------------------------------------------------------
    def log(self, level, msg, *args):
        """One line in nginx's shape: ``*<n> <msg> while <action>, client: ..., server: ...``."""
        if log.isEnabledFor(level):
            log_line(level, self.info, self.listener, self.peer, self.action, msg, *args)

    # -- the life cycle ----------------------------------------------------
    def run(self):
        if log.isEnabledFor(logging.INFO):  # nginx's first line of a session
            info = self.info
            log.info("*%s client %s:%d connected to %s", info.seq, info.client_addr,
                     info.client_port, self.listener.text)
        try:
            for phase in self.listener.pipeline:
                phase(self)
            self.hand_off()
        except Reject as exc:
            self.refusal = _bare(exc)
            self.registry.reject(exc.reason)
            self.log(exc.level, "%s", exc)
        except OSError as exc:  # a socket error mid-phase ends this session only
            self.refusal = _bare(exc)
            self.log(logging.ERROR, "%s", exc.strerror or exc)
        finally:
            if self.relay is None:  # never handed off: this greenlet cleans up
                self.sock.close()
                if self.upstream_sock is not None:
                    self.upstream_sock.close()
                if self.tracked:
                    self.registry.remove(self.info)
                self.ended()

    def ended(self):
        """Give back the accept slot and run the cleanup callbacks (once): the
        session holds nothing any more; then its access log line."""
        cleanup, self.cleanup = self.cleanup, None
        if cleanup is None:
            return
        self.listener.gate.leave()
        for release in cleanup:
            release()
        if self.proxy.access_log is not None:
            self.proxy.access_log.session(self)

    def track(self):
        """Show the session as live (from the route match on); the registry
        gets this object as the handle to close or end it."""
        self.registry.add(self.info, self)
        self.tracked = True

    def set_state(self, state):
        self.registry.set_state(self.info, state)

    def close(self):
        """Close at once (an operator's Disconnect, or a forced stop): the phase
        waiting on a socket fails.  (Once relaying, the ``RelayedSession`` is
        the registry's handle instead.)"""
        self.set_state("closing")
        for s in (self.sock, self.upstream_sock):
            if s is not None:
                shutdown(s, socket.SHUT_RDWR)

    def end(self, code=SERVER_SHUTTING_DOWN, grace=5.0, server_reference=None):
        """A session not relaying yet has no packet boundary to wait for: closed at once."""
        self.close()

    def hand_off(self):
        """Give both sockets to the relay; this greenlet then returns."""
        if self.info.state == "closing":
            return  # an operator closed it while we dialled
        idle = self.idle_timeout()
        # Both sockets are non-blocking already, and the client's TCP_NODELAY
        # came from the listener: the relay takes them as they are.
        client, upstream = self.sock, self.upstream_sock
        self.upstream_sock = None
        mqtt = self.route.mqtt is not None
        if self.ws is not None:  # MQTT bytes in frames, or frames passed through
            client, mqtt = self.ws.wrap(client), mqtt and not self.ws.passthrough
        self.set_state("relaying")
        self.action = PROXYING
        relay = self.relay = RelayedSession(self, client, upstream, idle, mqtt)
        self.registry.set_handle(self.info, relay)  # an operator's close or end goes to it
        self.proxy.relays.run(relay)

    def idle_timeout(self):
        """Seconds of silence both ways before the relay gives up.

        An MQTT client that announced a keep alive must send something within
        1.5 times it or the broker drops it (MQTT 3.1.1 §3.1.2.10, 5.0
        §3.1.2.10), so a silent session is dead by then; with no keep alive
        (0) the upstream's timeout or ``gproxy.proxy.timeout`` applies.
        """
        if self.keep_alive:
            return 1.5 * self.keep_alive
        return (self.upstream.idle_timeout or self.settings.idle_timeout
                or DEFAULT_PROXY_TIMEOUT)
