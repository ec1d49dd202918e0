"""One upstream as the data path uses it: nodes, balancing settings, its balancer.

``Upstream`` is built from a stored (already checked) upstream dict, or a
route's inline one, and never changed; a table update that keeps its nodes
and balancing hands the new ``Upstream`` the old balancer (``previous``), so
the ring and the round-robin position survive.  Pure: no sockets, no DNS
(domain nodes are resolved by the data path, which asks for a balancer of
the answer).
"""

import ipaddress

from gproxy.model.balancer import Balancer, Node


def parse_nodes(nodes):
    """APISIX's two node forms (map or array) as a list of Node.  Numbers are made
    ints: JSON's ``2.0`` passes the schema's ``integer`` (as in Lua) but a ring or a
    socket wants an int."""
    if isinstance(nodes, dict):
        out = []
        for addr, weight in nodes.items():
            host, _, port = addr.rpartition(":")
            if not host:  # "host" alone: APISIX defaults the port by scheme
                host, port = addr, "80"
            out.append(Node(host, int(port), int(weight)))
        return out
    return [Node(n["host"], int(n.get("port", 80)), int(n["weight"]), int(n.get("priority", 0)))
            for n in nodes or ()]


def is_ip(host):
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


class Upstream:
    """One upstream: its nodes, balancer settings and (for IP nodes) its balancer.

    ``previous`` (the upstream this one replaces) lends its balancers when they
    are what this one would build; ``pause`` is called while a ring is built.
    ``name`` (APISIX's resource key) and ``shared`` (a ``loadaware.Shared``)
    give least_conn and ewma the state that outlives a table swap.
    """

    def __init__(self, conf, chash_ring="apisix", previous=None, pause=None, name=None,
                 shared=None):
        self.conf = conf
        self.id = None if conf.get("id") is None else str(conf["id"])
        self.type = conf.get("type", "roundrobin")
        self.hash_on = conf.get("hash_on", "vars")
        self.key = conf.get("key")
        self._template = _template(self.key or "")
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
        self._dns_balancer = None  # rebuilt when a lookup gives other addresses
        self._balancer = None
        if previous is not None:
            self._keep(previous)
        if not self.needs_dns and self._balancer is None:
            self._balancer = self._build(self.nodes, pause)

    def _keep(self, previous):
        old = previous._balancer
        if old is not None and old.same_as(self.nodes, self.type, self._chash_ring):
            self._balancer = old
        old = previous._dns_balancer
        if self.needs_dns and old is not None and old.same_as(old.nodes, self.type,
                                                              self._chash_ring):
            self._dns_balancer = old

    def _build(self, nodes, pause=None):
        return Balancer(nodes, self.type, self._chash_ring, pause, self.name, self._shared)

    def balancer(self, resolved=None, pause=None):
        """The balancer for ``resolved`` nodes (domain upstreams) or the static one."""
        if resolved is None:
            return self._balancer
        if self._dns_balancer is None or self._dns_balancer.nodes != resolved:
            self._dns_balancer = self._build(resolved, pause)
        return self._dns_balancer

    def healthy(self):
        """False only when its health checks mark every node unhealthy."""
        health = self.health
        return health is None or any(n.addr not in health.unhealthy for n in self.nodes)

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
            value = "".join(text if name is None else _text(found.get(name, ""))
                            for text, name in self._template)
        return None if value is None or value == "" else value

    def no_nodes(self):
        """Why a session finds no node here, in APISIX's words (set_by_route)."""
        if self.discovery_type is not None and "nodes" not in self.conf:
            return "failed to set upstream: discovery %s is uninitialized" % self.discovery_type
        return "failed to set upstream: no valid upstream node"

    def tries(self, nnodes):
        """Dial attempts allowed: ``retries`` + 1, default one per node."""
        return nnodes if self.retries is None else self.retries + 1


def _template(key):
    """A ``vars_combinations`` key as ``(text, None)`` and ``("", variable)`` parts:
    ``$name`` (word characters, as ``\\$(\\w+)``) is a variable, the rest is text."""
    first, *rest = key.split("$")
    parts = [(first, None)]
    for part in rest:
        n = 0
        while n < len(part) and (part[n].isalnum() or part[n] == "_"):
            n += 1
        if n:
            parts += [("", part[:n]), (part[n:], None)]
        else:
            parts.append(("$" + part, None))
    return tuple(parts)


def _text(value):
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else value
