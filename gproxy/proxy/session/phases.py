"""The phases every session goes through after its listener's own ones.

Each phase is a function of the ``Session``: it reads what earlier phases
set, sets what later ones need, and refuses the client by raising ``Reject``.
A new kind of session start (PROXY header, TLS handshake) is one more
function in a listener's list, not a branch here.  MQTT over WebSocket rides
on the mqtt-proxy preread (the first byte tells, ``wspreread``); in its
passthrough mode the broker's upgrade comes before the replay.

    match_route -> find_upstream -> ip_restriction -> limits -> preread -> refine
                -> dial -> replay                                    (then the relay)

A route is chosen in one of two places.  Usually the address match decides
(APISIX's router) and ``find_upstream``, ``ip_restriction`` and ``limits``
run before the preread, in APISIX's plugin order.  When routes with ``vars``
are among the candidates (docs/routing.md), the match leaves ``s.route``
unset: the preread reads the CONNECT under every candidate's terms
(``PREREAD_ANY``), ``refine`` chooses the route from it and runs those three
route phases then (``ROUTE_PHASES``).  ``refine`` also picks the upstream of
a route with a traffic split: both are what the CONNECT decides.
"""

import logging

from gproxy.errors import NoUpstream, Reject
from gproxy.model.mqttproxy import PREREAD_ANY
from gproxy.proxy import netio
from gproxy.proxy.session import dial as dialing
from gproxy.proxy.session import refine as refining
from gproxy.proxy.session.limits import limits
from gproxy.proxy.session.preread import preread_mqtt
from gproxy.proxy.session.restrict import ip_restriction
from gproxy.proxy.session.wspreread import preread_websocket, upgrade_upstream

PREREAD = "prereading client data"  # nginx's log actions
CONNECTING = "connecting to upstream"
PROXYING = "proxying connection"


def match_route(s):
    """APISIX's stream router, before any byte is read (§4.2).  A first candidate
    with ``vars`` leaves the route to ``refine``."""
    s.action = PREREAD
    info = s.info
    route = s.table.match(info.server_addr, info.server_port, info.client_addr, s.sni)
    if route is None:
        # Close before reading: a client that already sent bytes gets an RST.
        raise Reject("no_route", logging.INFO, "match(): not hit any route")
    limit = s.settings.max_connections
    if limit and len(s.registry) >= limit:
        raise Reject("limit", logging.ERROR, "too many sessions (max_connections %d)", limit)
    if route.vars is None:
        s.route = route
        info.route_id = route.id
    s.track()


def find_upstream(s):
    """``upstream_id`` wins over the inline upstream (§4.2)."""
    if s.route is None:
        return  # the CONNECT chooses the route: refine runs this
    upstream, err = s.table.upstream_for(s.route)
    if err:
        raise Reject("no_upstream", logging.ERROR, err)
    s.upstream = upstream
    s.info.upstream_id = s.route.upstream_id


def preread(s):
    """Read what the route's plugin needs before a node can be chosen.

    An mqtt-proxy route also serves MQTT over WebSocket on the same port
    (unless its ``websocket.enable`` is false): the first byte tells.
    """
    conf = s.route.mqtt if s.route is not None else PREREAD_ANY
    if conf is not None:
        preread_mqtt(s, conf, preread_websocket if conf.websocket.enable else None)


def refine(s):
    """Refine after the preread what the CONNECT decides: the route among the
    candidates (``vars``), then the upstream of a route with a traffic split."""
    if s.route is None:
        refining.refine(s, ROUTE_PHASES)
    if s.route.split is not None:
        refining.split(s)


def dial(s):
    s.action = CONNECTING
    try:
        dialing.dial(s)
    except NoUpstream as exc:
        raise Reject("upstream_unavailable", logging.ERROR, str(exc)) from None


def replay(s):
    """Every byte peeked goes to the node first, unchanged."""
    s.action = PROXYING
    if s.ws is not None and s.ws.passthrough:
        upgrade_upstream(s)  # the broker's WebSocket listener answers the upgrade first
    if not s.replay:
        return
    try:
        netio.sendall(s.upstream_sock, s.replay, s.settings.idle_timeout)
    except OSError as exc:
        raise Reject("replay_failed", logging.ERROR, "failed to replay the CONNECT upstream: %s",
                     exc.strerror or exc) from None
    s.info.bytes_in += len(s.replay)


#: The phases that need the route: before the preread when the addresses decide,
#: from ``refine`` when the CONNECT does.
ROUTE_PHASES = (find_upstream, ip_restriction, limits)
COMMON = (match_route, find_upstream, ip_restriction, limits, preread, refine, dial, replay)
