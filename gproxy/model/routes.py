"""The route table: stream routes and upstreams as immutable runtime objects.

``RouteTable`` is built from the store's plain dicts (already validated by
``resources``) and never mutated: a change builds a new table and the server
swaps one reference, so a live session keeps the route it matched.  A new
table is made from the last one and the changes (``updated``): what did not
change is the same object in both, and a changed upstream whose nodes and
balancing did not change keeps its balancer (ring, round-robin position), so
an update costs what changed, not what the table holds.  Matching
follows APISIX's ip_port router (docs/apisix-behaviour.md §4.2): routes with
``sni`` only match TLS connections with that SNI; otherwise the first route,
in load order, whose filters all pass wins.  gproxy's routes with ``vars``
(docs/routing.md) come before those, by ``priority``: ``match`` then gives
the first candidate and ``refine`` the route, once the CONNECT is known; a
table without ``vars`` never looks at them.  Pure: no sockets, no DNS.
"""

import ipaddress
import logging

from gproxy.model.iprestriction import IpRestriction
from gproxy.model.iprouter import IpPortRouter, sni_matches
from gproxy.model.mqttproxy import MqttConf
from gproxy.model.resources import ip_network
from gproxy.model.upstream import Upstream, is_ip, parse_nodes  # noqa: F401 (re-exported)
from gproxy.model.varsroutes import VarsRoutes

log = logging.getLogger("gproxy.model.routes")

#: nginx stream defaults when an upstream has no ``timeout`` (seconds).
DEFAULT_CONNECT_TIMEOUT = 60.0
DEFAULT_PROXY_TIMEOUT = 600.0


class Route:
    """One stream route: match filters, optional mqtt-proxy conf, its upstream."""

    def __init__(self, conf, upstream=None):
        self.conf = conf
        self.id = str(conf.get("id"))
        self.remote_net = _net(conf.get("remote_addr"))
        self.server_net = _net(conf.get("server_addr"))
        self.server_port = conf.get("server_port")
        self.sni = conf.get("sni")
        self.upstream_id = None if conf.get("upstream_id") is None else str(conf["upstream_id"])
        self.upstream = upstream
        plugins = conf.get("plugins") or {}
        self.limit_conn = plugins.get("limit-conn")  # APISIX's stream limit-conn conf
        self.limit_rate = plugins.get("gproxy-limit-rate")  # gproxy's extension
        restrict = plugins.get("ip-restriction")
        self.ip_restriction = IpRestriction(restrict) if restrict is not None else None
        plugin = plugins.get("mqtt-proxy")
        self.mqtt = None
        if plugin is not None:
            self.mqtt = MqttConf.from_plugin(plugin)
        # ``vars``: the route is one candidate among those its addresses match,
        # chosen by the CONNECT (RouteTable.refine); None: it is a fallback.
        self.vars = None if self.mqtt is None else self.mqtt.vars
        self.priority = 0 if self.mqtt is None else self.mqtt.priority
        self.split = None if self.mqtt is None else self.mqtt.split
        self.plugin_upstream = None
        old = (plugin or {}).get("upstream")  # deprecated (≤ 2.15), used only without another
        if isinstance(old, dict) and (old.get("host") or old.get("ip")) and old.get("port"):
            host = old.get("host") or old.get("ip")
            self.plugin_upstream = Upstream({"nodes": [{"host": host, "port": old["port"],
                                                        "weight": 1}]})

    def reaches(self, server_ip, server_port, remote_ip, sni):
        """Its filters pass, SNI included (a route with ``sni`` needs a TLS client
        that sent a name it matches)."""
        if self.sni and not (sni and sni_matches(self.sni, sni)):
            return False
        return self.matches(server_ip, server_port, remote_ip)

    def matches(self, server_ip, server_port, remote_ip):
        if self.server_port is not None and self.server_port != server_port:
            return False
        if self.remote_net is not None and not _contains(self.remote_net, remote_ip):
            return False
        if self.server_net is not None and not _contains(self.server_net, server_ip):
            return False
        return True


def _net(text):
    return None if text is None else ip_network(text)


def _contains(net, ip):
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if addr.version != net.version and getattr(addr, "ipv4_mapped", None):
        addr = addr.ipv4_mapped  # an IPv4 client on a dual-stack listener
    return addr.version == net.version and addr in net


class RouteTable:
    """An immutable snapshot of every stream route and upstream."""

    def __init__(self, stream_routes=(), upstreams=(), chash_ring="apisix", pause=None,
                 shared=None):
        """``shared``: a ``loadaware.Shared`` that least_conn and ewma keep across tables."""
        self.chash_ring = chash_ring
        self.shared = shared
        self.upstreams = {}
        for conf in upstreams:
            up = self._upstream(conf, None, pause)
            self.upstreams[up.id] = up
        self._by_id = {}
        for conf in stream_routes:
            route = self._route(conf, None, pause)
            if route is not None:
                self._by_id[route.id] = route
        self.routes = list(self._by_id.values())
        self._index()

    def _upstream(self, conf, previous, pause):
        up_id = None if conf.get("id") is None else str(conf["id"])
        return Upstream(conf, self.chash_ring, previous, pause, "/apisix/upstreams/%s" % up_id,
                        self.shared)

    def _route(self, conf, previous, pause):
        """A Route for ``conf``, or None for an xRPC subordinate (never matched directly)."""
        if (conf.get("protocol") or {}).get("superior_id") is not None:
            return None
        inline = conf.get("upstream")
        old = previous.upstream if previous is not None else None
        name = "/apisix/stream_routes/%s" % conf.get("id")
        return Route(conf, Upstream(inline, self.chash_ring, old, pause, name, self.shared)
                     if inline else None)

    def _index(self, pause=None):
        pause = pause or _none
        # APISIX's ip_port router over the routes without vars, indexed by
        # server port and exact server name (model/iprouter.py).
        self._router = IpPortRouter([r for r in self.routes if r.vars is None])
        pause()
        # Routes with vars, in the order the CONNECT tries them (docs/routing.md);
        # ``_first`` is their list for ``match``: empty without vars, one cheap loop.
        self._refined = VarsRoutes(self.routes)
        self._first = self._refined.ordered

    def updated(self, changes, pause=None):
        """A new table: this one with ``changes`` applied, sharing what did not change.

        ``changes`` are ``(kind, id, value)`` (``value`` None: deleted) or
        ``(kind, None, [id, ...])``: the kind's objects in a new load order.
        A new route goes last, a changed one keeps its place (APISIX's order
        for etcd: keys appended as they come, replaced in place).
        """
        pause = pause or _none
        new = object.__new__(RouteTable)
        new.chash_ring = self.chash_ring
        new.shared = self.shared
        new.upstreams = dict(self.upstreams)
        pause()  # each copy and pass is one step: about a millisecond at 10,000
        new._by_id, routes, order = dict(self._by_id), list(self.routes), None
        for kind, id_, value in changes:
            pause()
            if id_ is None:
                order = value if kind == "stream_routes" else order
            elif kind == "upstreams":
                previous = new.upstreams.pop(id_, None)
                if value is not None:
                    new.upstreams[id_] = new._upstream(value, previous, pause)
            elif kind == "stream_routes":
                new._replace(routes, id_, value, pause)
        if order is not None:
            pause()
            routes = [new._by_id[i] for i in order if i in new._by_id]
        pause()
        new.routes = routes
        new._index(pause)
        return new

    def _replace(self, routes, id_, value, pause):
        old = self._by_id.pop(id_, None)
        route = None if value is None else self._route(value, old, pause)
        if route is not None:
            self._by_id[id_] = route
        if old is not None and route is not None:
            routes[routes.index(old)] = route
        elif old is not None:
            routes.remove(old)
        elif route is not None:
            routes.append(route)

    def route_ids(self):
        """Every route's id, in load order."""
        return [route.id for route in self.routes]

    def upstream_named(self, name):
        """The upstream whose health checks are named ``name`` (``/apisix/upstreams/1``
        or, for a route's inline upstream, ``/apisix/stream_routes/1``), or None."""
        kind, _, id_ = name[len("/apisix/"):].partition("/")
        if kind == "upstreams":
            return self.upstreams.get(id_)
        route = self._by_id.get(id_)
        return route.upstream if route is not None else None

    def match(self, server_ip, server_port, remote_ip, sni=None, fallback_only=False):
        """The first route to try, from what is known before any byte is read;
        None: ``not hit any route``.

        Without ``vars`` anywhere this is APISIX's router (§4.2): the first
        route whose filters pass.  ``sni`` is the TLS client's server name
        (None for plain TCP, which never matches a route with ``sni``); a TLS
        connection whose name no ``sni`` route takes falls through to the
        routes without one.  A route with ``vars`` whose address filters pass
        comes first, highest ``priority`` first: the answer then has ``vars``
        and only ``refine`` can say, once the CONNECT is read, which route it
        is.  ``fallback_only``: the routes without ``vars`` only.
        """
        if not fallback_only:  # inline, not a call: every connection runs this
            for route in self._first:
                if route.reaches(server_ip, server_port, remote_ip, sni):
                    return route
        return self._router.match(server_ip, server_port, remote_ip, sni)

    def refine(self, server_ip, server_port, remote_ip, sni, values):
        """The route for a connection whose CONNECT gave ``values`` (variable name
        -> bytes, None when unset): the first route with ``vars``, highest
        ``priority`` first and ties by id, whose filters and vars pass, else the
        route without vars ``match`` would have taken; None: no route."""
        for route in self._refined.candidates(values):
            if route.reaches(server_ip, server_port, remote_ip, sni) and route.vars.eval(values):
                return route
        return self.match(server_ip, server_port, remote_ip, sni, True)

    def checked_upstreams(self):
        """Upstreams with ``checks`` that a route can reach, by name (APISIX checks
        only upstreams with more than one node)."""
        found = {}
        for up in list(self.upstreams.values()) + [r.upstream for r in self.routes]:
            if up is not None and up.checks and len(up.nodes) > 1:
                found[up.name] = up
        return found

    def upstream_for(self, route):
        """The upstream a matched route proxies to: ``upstream_id`` wins over inline.

        Returns ``(upstream, None)`` or ``(None, error line)`` in APISIX's wording.
        """
        if route.upstream_id is not None:
            up = self.upstreams.get(route.upstream_id)
            if up is None:
                return None, "failed to find upstream by id: %s" % route.upstream_id
            return up, None
        if route.upstream is not None:
            return route.upstream, None
        if route.plugin_upstream is not None:
            return route.plugin_upstream, None
        return None, ("failed to set upstream: missing upstream configuration "
                      "in Route or Service")


def _none():
    pass
