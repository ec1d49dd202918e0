"""Where a live session belongs now: the model behind rebalancing (pure).

A session is *misplaced* when its route's upstream, as it is in the current
route table, would pick another node for it than the one it is on: a chash
ring that gained, lost or re-weighted a node gives its hash key to another
node; a roundrobin upstream no longer offers its node (removed, or weight 0:
drained).  ``Placement(table).check(info)`` answers ``(misplaced, move_to)``
from what the session record keeps (route id, node, the chash key it was
dialled with) and nothing else; ``move_to`` is the node a chash client will
land on when it reconnects, None when the balancer decides at random
(roundrobin).  Sessions whose route is gone, whose upstream cannot be found,
or that have no node yet are never misplaced: there is nothing to compare.
A route with a traffic split first asks which side the session's key
belongs on now, so moving a canary from 10% to 20% makes the devices it
moves misplaced (on the old side's nodes), and rebalancing sends just them over.
"""

from gproxy.model.split import split_upstream

#: nginx-style variables a chash ``key`` may name, from a session record (the same
#: names as ``proxy.dial.session_vars`` offers a dial, as text).
RECORD_VARS = {
    "remote_addr": lambda i: i.client_addr,
    "remote_port": lambda i: str(i.client_port),
    "server_addr": lambda i: i.server_addr,
    "server_port": lambda i: str(i.server_port),
    "mqtt_client_id": lambda i: i.client_id or None,
    "mqtt_username": lambda i: i.username or None,
    "tls_client_cn": lambda i: i.tls_client_cn or None,
}


class _RecordVars:
    """Variables of one record, looked up lazily (most keys name only one)."""

    def __init__(self, info):
        self.info = info

    def get(self, name, default=None):
        getter = RECORD_VARS.get(name)
        value = getter(self.info) if getter else None
        return default if value is None else value


class _Target:
    """One upstream's answer: a chash balancer, or the nodes roundrobin may pick."""

    def __init__(self, upstream):
        self.upstream = upstream
        self.balancer = upstream.last_balancer
        self.chash = upstream.type == "chash"
        self.eligible = None
        if self.balancer is not None and not self.chash:
            self.eligible = _eligible(self.balancer.nodes)

    def check(self, info):
        if self.balancer is None:  # a domain upstream not resolved yet: unknown
            return False, None
        if not self.chash:
            return info.node not in self.eligible, None
        key = info.hash_key
        if key is None:  # dialled when the upstream was not chash: derive it now
            value = self.upstream.hash_value(_RecordVars(info))
            key = (value if value is not None else info.client_addr)
            key = key if isinstance(key, bytes) else key.encode()
        node = next(self.balancer.candidates(key, 1), None)
        if node is None:
            return False, None
        return node.addr != info.node, node.addr


def _eligible(nodes):
    """Addresses roundrobin may hand a new client: the highest priority group's
    nodes with weight > 0 (all of them if every weight is 0, as resty does;
    the only node of a one-node upstream, which skips the balancer)."""
    if len(nodes) == 1:
        return {nodes[0].addr}
    top = max(node.priority for node in nodes)
    group = [node for node in nodes if node.priority == top]
    weighted = {node.addr for node in group if node.weight > 0}
    return weighted or {node.addr for node in group}


class _SplitTarget:
    """A route with a traffic split: the side the record's key belongs on now
    (model.split, health included), then that side's answer."""

    def __init__(self, table, route):
        self.table = table
        self.route = route
        self.sides = {}  # id(upstream) -> _Target

    def check(self, info):
        value = _RecordVars(info).get(self.route.split.key) or info.client_addr
        upstream, _, _ = split_upstream(self.table, self.route, value.encode(
            "utf-8", "surrogateescape"))
        if upstream is None or not upstream.nodes:
            return False, None
        target = self.sides.get(id(upstream))
        if target is None:
            target = self.sides[id(upstream)] = _Target(upstream)
        return target.check(info)


class Placement:
    """Misplacement checks against one route table snapshot."""

    def __init__(self, table):
        self.table = table
        self._routes = {route.id: route for route in table.routes}
        self._targets = {}  # route id -> _Target, or None when it has no upstream

    def _target(self, route_id):
        if route_id in self._targets:
            return self._targets[route_id]
        route = self._routes.get(route_id)
        target = None
        if route is not None and route.split is not None:
            target = _SplitTarget(self.table, route)
        elif route is not None:
            upstream, _ = self.table.upstream_for(route)
            if upstream is not None and upstream.nodes:
                target = _Target(upstream)
        self._targets[route_id] = target
        return target

    def check(self, info):
        """``(misplaced, move_to)`` for a session record."""
        if info.node is None:
            return False, None
        target = self._target(info.route_id)
        if target is None:
            return False, None
        return target.check(info)

    def misplaced(self, info):
        return self.check(info)[0]
