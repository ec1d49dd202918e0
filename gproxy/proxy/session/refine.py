"""What the CONNECT decides, in the ``refine`` phase: which route, and which upstream.

``refine`` runs after the preread.  When the address match left the choice
to routes with ``vars`` (docs/routing.md), no route was set and the preread
read the CONNECT under ``PREREAD_ANY`` (any protocol level, any WebSocket
path or origin).  Here the route table's ``refine`` takes the variables of
the CONNECT and the connection and names the route; then that route's own
mqtt-proxy conf is applied (protocol name and level with APISIX's lines, the
WebSocket options, ``set_connect``) and the phases that need the route
(its upstream, its limits) run.  No route passing is ``not hit any route``.
A WebSocket client, upgraded already, hears why in a Close frame.

``split`` runs next, for a route with ``traffic_split``: it sends
the client to the side its key hashes to (model.split), or to the next one
when health checks find no healthy node there.
"""

import logging

from gproxy.errors import Reject
from gproxy.model.split import split_upstream
from gproxy.proxy.session.dial import session_vars
from gproxy.proxy.session.preread import accept_connect
from gproxy.proxy.session.wspreread import apply_options, refused_after_upgrade


def _text(value):
    return value.encode("utf-8", "surrogateescape") if value else None


#: The variables a route's ``vars`` read, as nginx-style strings (bytes; None: unset),
#: from the session (the preread of candidates always reads a CONNECT).
VARIABLES = {
    "mqtt_client_id": lambda s: s.connect.client_id or None,  # empty: unset, as APISIX's
    "mqtt_username": lambda s: s.connect.username or None,
    "mqtt_protocol_name": lambda s: s.connect.protocol_name,
    "mqtt_protocol_level": lambda s: b"%d" % s.connect.protocol_level,
    "tls_client_cn": lambda s: _text(s.info.tls_client_cn),
    "sni": lambda s: _text(s.sni),
    "remote_addr": lambda s: s.info.client_addr.encode(),
    "server_addr": lambda s: s.info.server_addr.encode(),
    "server_port": lambda s: b"%d" % s.info.server_port,
}


class ConnectValues:
    """``get(name)`` of the variables above, worked out when a rule reads one (most
    rules read one or two)."""

    __slots__ = ("s",)

    def __init__(self, s):
        self.s = s

    def get(self, name, default=None):
        found = VARIABLES.get(name)
        return default if found is None else found(self.s)


def refine(s, bound=()):
    """Choose the route by the CONNECT, apply its conf, then run ``bound`` (the phases
    that need the route).  Only for a session whose address match left it open."""
    info = s.info
    try:
        route = s.table.refine(info.server_addr, info.server_port, info.client_addr, s.sni,
                               ConnectValues(s))
        if route is None:
            raise Reject("no_route", logging.INFO, "match(): not hit any route")
        s.route = route
        s.registry.set_route(info, route.id)
        s.log(logging.INFO, "route chosen by the connect: route=%s priority=%d",
              route.id, route.priority)
        _apply(s, route)
        for phase in bound:
            phase(s)
    except Reject as exc:
        if s.ws is not None:
            refused_after_upgrade(s, exc)
        raise


def _apply(s, route):
    """The chosen route's own conf over the CONNECT read; sets the replay."""
    conf = route.mqtt
    if conf is None:  # a plain TCP fallback: the bytes go on as read
        if s.ws is not None:
            raise Reject("ws_disabled", logging.WARNING,
                         "websocket refused by the route: it has no mqtt-proxy plugin")
        return
    frames = apply_options(s, conf.websocket) if s.ws is not None else None
    replay = accept_connect(s, conf, s.replay)
    s.replay = frames if frames is not None else replay


def split(s):
    """A route's ``traffic_split``: the upstream for this client's key."""
    route = s.route
    value = session_vars(s).get(route.split.key)
    if value is None or value in ("", b""):
        value = s.info.client_addr  # as chash: no key, the client address
    key = value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")
    upstream, failed_over, err = split_upstream(s.table, route, key)
    if err:
        raise Reject("no_upstream", logging.ERROR, err)
    if failed_over:
        s.log(logging.WARNING, "traffic split: no healthy node on the client's side, "
              "using upstream %s", upstream.id or "of the route")
    s.upstream = upstream
    s.info.upstream_id = upstream.id
