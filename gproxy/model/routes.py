"""The route table: stream routes and upstreams as immutable runtime objects.

``RouteTable`` is built from the store's plain dicts (already validated by
``resources``) and never mutated: a change builds a new table and the server
swaps one reference, so a live session keeps the route it matched.  Matching
follows APISIX's ip_port router (docs/apisix-behaviour.md §4.2): routes with
``sni`` only match TLS connections with that SNI; otherwise the first route,
in load order, whose filters all pass wins.  Pure: no sockets, no DNS.
"""

import ipaddress
import logging
import re
from dataclasses import dataclass

from gproxy.model.balancer import Balancer, Node
from gproxy.model.iprestriction import IpRestriction
from gproxy.model.resources import ip_network

log = logging.getLogger("gproxy.model.routes")

#: nginx stream defaults when an upstream has no ``timeout`` (seconds).
DEFAULT_CONNECT_TIMEOUT = 60.0
DEFAULT_PROXY_TIMEOUT = 600.0


def parse_nodes(nodes):
    """APISIX's two node forms (map or array) as a list of Node."""
    if isinstance(nodes, dict):
        out = []
        for addr, weight in nodes.items():
            host, _, port = addr.rpartition(":")
            if not host:  # "host" alone: APISIX defaults the port by scheme
                host, port = addr, "80"
            out.append(Node(host, int(port), weight))
        return out
    return [Node(n["host"], int(n.get("port", 80)), n["weight"], n.get("priority", 0))
            for n in nodes or ()]


def is_ip(host):
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


class Upstream:
    """One upstream: its nodes, balancer settings and (for IP nodes) its balancer."""

    def __init__(self, conf, chash_ring="apisix", name=None, shared=None):
        self.conf = conf
        self.id = None if conf.get("id") is None else str(conf["id"])
        self.type = conf.get("type", "roundrobin")
        self.hash_on = conf.get("hash_on", "vars")
        self.key = conf.get("key")
        # stream: http (APISIX's default) is tcp at runtime; tls dials TLS (§5.1)
        self.scheme = "tls" if conf.get("scheme") == "tls" else "tcp"
        self.tls = conf.get("tls") or {}
        self.nodes = parse_nodes(conf.get("nodes"))
        # service discovery (gproxy.discovery fills ``nodes`` in before the table is built)
        self.discovery_type = conf.get("discovery_type") if conf.get("service_name") else None
        self.needs_dns = not all(is_ip(n.host) for n in self.nodes)
        retries = conf.get("retries")
        self.retries = retries if retries is not None and retries >= 0 else None
        self.retry_timeout = conf.get("retry_timeout") or 0
        timeout = conf.get("timeout") or {}
        self.connect_timeout = timeout.get("connect")  # None: gproxy.proxy.connect_timeout
        # The upstream's own send/read timeouts win over gproxy.proxy.timeout.
        self.idle_timeout = (max(timeout["send"], timeout["read"])
                             if "send" in timeout and "read" in timeout else None)
        self.checks = conf.get("checks") or None
        self.name = name  # APISIX's resource key: /apisix/upstreams/<id> or /apisix/stream_routes/<id>
        self.health = None  # a model.health.HealthState, set when this upstream is checked
        self._chash_ring = chash_ring
        self._shared = shared  # least_conn counts and ewma latencies across tables
        self._balancer = None if self.needs_dns else self._build(self.nodes)
        self._dns_balancer = None  # rebuilt when a lookup gives other addresses

    def _build(self, nodes):
        return Balancer(nodes, self.type, self._chash_ring, self.name, self._shared)

    def balancer(self, resolved=None):
        """The balancer for ``resolved`` nodes (domain upstreams) or the static one."""
        if resolved is None:
            return self._balancer
        if self._dns_balancer is None or self._dns_balancer.nodes != resolved:
            self._dns_balancer = self._build(resolved)
        return self._dns_balancer

    @property
    def last_balancer(self):
        """The balancer in use now: the static one, or the last DNS answer's (None
        before the first lookup)."""
        return self._balancer if self._balancer is not None else self._dns_balancer

    def hash_value(self, found):
        """The chash key from nginx-style variables ``found`` (str or bytes), or
        None when it is unset or empty: the caller then falls back to
        ``remote_addr``, as APISIX does (docs/apisix-behaviour.md §5.3)."""
        value = None
        if self.hash_on == "vars":
            value = found.get(self.key)
        elif self.hash_on == "vars_combinations" and self.key:
            value = re.sub(r"\$(\w+)", lambda m: _text(found.get(m.group(1), "")), self.key)
        return None if value is None or value == "" else value

    def no_nodes(self):
        """Why a session finds no node here, in APISIX's words (set_by_route)."""
        if self.discovery_type is not None and "nodes" not in self.conf:
            return "failed to set upstream: discovery %s is uninitialized" % self.discovery_type
        return "failed to set upstream: no valid upstream node"

    def tries(self, nnodes):
        """Dial attempts allowed: ``retries`` + 1, default one per node."""
        return nnodes if self.retries is None else self.retries + 1


@dataclass(frozen=True)
class WebSocketConf:
    """gproxy's ``websocket`` option of mqtt-proxy (docs/websocket.md)."""

    enable: bool = True
    path: str = None         # None: any path
    origins: tuple = None    # lower-cased; None: any Origin
    passthrough: bool = False  # pass the upgrade and frames to a WebSocket broker

    @classmethod
    def from_conf(cls, conf):
        conf = conf or {}
        origins = conf.get("allow_origins")
        return cls(conf.get("enable", True), conf.get("path"),
                   None if origins is None else tuple(o.lower() for o in origins),
                   conf.get("mode") == "passthrough")


@dataclass(frozen=True)
class MqttConf:
    protocol_name: str
    protocol_level: int
    websocket: WebSocketConf = WebSocketConf()
    set_connect: tuple = ()  # ((field, "$var template"), ...): gproxy's CONNECT rewrite


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
            self.mqtt = MqttConf(plugin.get("protocol_name", "MQTT"), plugin["protocol_level"],
                                 WebSocketConf.from_conf(plugin.get("websocket")),
                                 tuple(sorted((plugin.get("set_connect") or {}).items())))
        self.plugin_upstream = None
        old = (plugin or {}).get("upstream")  # deprecated (≤ 2.15), used only without another
        if isinstance(old, dict) and (old.get("host") or old.get("ip")) and old.get("port"):
            host = old.get("host") or old.get("ip")
            self.plugin_upstream = Upstream({"nodes": [{"host": host, "port": old["port"],
                                                        "weight": 1}]})

    def matches(self, server_ip, server_port, remote_ip):
        if self.server_port is not None and self.server_port != server_port:
            return False
        if self.remote_net is not None and not _contains(self.remote_net, remote_ip):
            return False
        if self.server_net is not None and not _contains(self.server_net, server_ip):
            return False
        return True


def _text(value):
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else value


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

    def __init__(self, stream_routes=(), upstreams=(), chash_ring="apisix", shared=None):
        """``shared``: a ``loadaware.Shared`` that least_conn and ewma keep across tables."""
        self.upstreams = {}
        for conf in upstreams:
            up_id = None if conf.get("id") is None else str(conf["id"])
            up = Upstream(conf, chash_ring, "/apisix/upstreams/%s" % up_id, shared)
            self.upstreams[up.id] = up
        self.routes = []
        for conf in stream_routes:
            if (conf.get("protocol") or {}).get("superior_id") is not None:
                continue  # xRPC subordinate routes are never matched directly
            inline = conf.get("upstream")
            name = "/apisix/stream_routes/%s" % conf.get("id")
            route = Route(conf, Upstream(inline, chash_ring, name, shared) if inline else None)
            self.routes.append(route)
        self._plain = [r for r in self.routes if not r.sni]
        # ip_port.lua's radixtree on reversed SNIs: an exact name before any
        # wildcard, a longer wildcard before a shorter one, "*" last; load order
        # among routes with the same sni.
        self._tls = sorted((r for r in self.routes if r.sni), key=_sni_rank)

    def match(self, server_ip, server_port, remote_ip, sni=None):
        """The first route whose filters pass, or None (APISIX: ``not hit any route``).

        ``sni`` is the TLS client's server name (None for plain TCP, which
        never matches a route with ``sni``); a TLS connection whose name no
        ``sni`` route takes falls through to the routes without one (§4.2).
        """
        if sni:
            for route in self._tls:
                if _sni_matches(route.sni, sni) and route.matches(
                        server_ip, server_port, remote_ip):
                    return route
        for route in self._plain:
            if route.matches(server_ip, server_port, remote_ip):
                return route
        return None

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


def _sni_rank(route):
    pattern = route.sni.lower()
    if not pattern.startswith("*"):
        return (0, 0)
    return (1, -len(pattern))


def _sni_matches(pattern, sni):
    """``*.x.com`` matches any depth (``a.b.x.com``): routes, unlike certificates,
    care only about the suffix (ip_port.lua); ``*`` matches every name."""
    pattern, sni = pattern.lower(), sni.lower()
    if pattern.startswith("*"):
        return sni.endswith(pattern[1:]) and len(sni) > len(pattern) - 1
    return pattern == sni
