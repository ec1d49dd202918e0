"""APISIX's ip_port stream router over the routes without ``vars``, indexed.

The order is APISIX's (docs/apisix-behaviour.md §4.2, ``ip_port.lua``): a TLS
connection's server name is looked up among the routes with ``sni`` first
(an exact name before any wildcard, a longer wildcard before a shorter one,
``*`` last, load order among equals), then every route without ``sni`` in
load order; the first whose address filters pass wins.  APISIX walks the
routes one by one; gproxy answers the same while looking only at the routes
that can match: routes without ``sni`` by server port (those with no
``server_port`` merged in, in load order, once per port), routes with an
exact ``sni`` by name.  At 10,000 routes a connection to a port that has a
few of them then costs a few checks, not 10,000 (a ~5 ms hold of the hub).
Pure and immutable, like the table that owns it.
"""

import heapq
from operator import itemgetter

MAX_CACHED_PORTS = 4096  # listener ports seen; beyond that a port's list is merged per call
_position = itemgetter(0)


class IpPortRouter:
    """``match(server_ip, server_port, remote_ip, sni)`` over routes without ``vars``."""

    def __init__(self, routes):
        self._any_port = []  # [(load position, route)] with no server_port filter
        self._by_port = {}  # server_port -> [(load position, route)]
        self._exact = {}  # lower-cased sni -> [route], load order
        wildcards = []
        for position, route in enumerate(routes):
            if route.sni:
                name = route.sni.lower()
                if name.startswith("*"):
                    wildcards.append(route)
                else:
                    self._exact.setdefault(name, []).append(route)
            elif route.server_port is None:
                self._any_port.append((position, route))
            else:
                self._by_port.setdefault(route.server_port, []).append((position, route))
        self._wildcards = sorted(wildcards, key=lambda r: -len(r.sni))  # "*" (length 1) last
        self._ports = {}  # server_port -> (route, ...): the merged list, built on first use

    def plain(self, server_port):
        """The routes without ``sni`` that a connection to ``server_port`` may take,
        in load order."""
        routes = self._ports.get(server_port)
        if routes is None:
            routes = tuple(route for _, route in heapq.merge(
                self._by_port.get(server_port, ()), self._any_port, key=_position))
            if len(self._ports) < MAX_CACHED_PORTS:
                self._ports[server_port] = routes
        return routes

    def match(self, server_ip, server_port, remote_ip, sni=None):
        """The first route whose filters pass, or None (APISIX: ``not hit any route``)."""
        if sni:
            name = sni.lower()
            for route in self._exact.get(name, ()):
                if route.matches(server_ip, server_port, remote_ip):
                    return route
            for route in self._wildcards:
                if _wildcard_matches(route.sni.lower(), name) and route.matches(
                        server_ip, server_port, remote_ip):
                    return route
        for route in self.plain(server_port):
            if route.matches(server_ip, server_port, remote_ip):
                return route
        return None


def _wildcard_matches(pattern, name):
    """``*.x.com`` matches any depth (``a.b.x.com``): routes, unlike certificates,
    care only about the suffix (ip_port.lua); ``*`` matches every name."""
    return name.endswith(pattern[1:]) and len(name) > len(pattern) - 1


def sni_matches(pattern, sni):
    """Whether a route's ``sni`` pattern takes the server name ``sni``."""
    pattern, sni = pattern.lower(), sni.lower()
    if pattern.startswith("*"):
        return _wildcard_matches(pattern, sni)
    return pattern == sni
