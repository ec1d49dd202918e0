"""Balancers: pick a node of an upstream for a hash key (pure, no I/O).

* ``ChashRing``  - bit-exact copy of the ring of ``resty.chash`` as APISIX's
  ``chash`` balancer builds it (docs/apisix-behaviour.md §5.3), so a client id
  lands on the same broker behind gproxy as behind APISIX.
* ``KetamaRing`` - uhashring's ketama ring, an opt-in alternative
  (``type: chash`` plus ``gproxy_ring: ketama`` on the upstream).
* ``RoundRobin`` - nginx/resty.roundrobin weighted round robin with a random start.
* ``least_conn`` and ``ewma`` - APISIX's load-aware pickers, in ``loadaware``.

Every picker answers ``pick(key, tried)``: the node to dial next, skipping the
nodes already tried on this session, or ``None`` when none is left.
``Balancer`` layers priority groups and the retry budget on top.
"""

import bisect
import math
import random
import struct
import zlib
from dataclasses import dataclass, field

from gproxy.model import loadaware

#: resty.chash gives every node 160 points per unit of (gcd-reduced) weight.
CHASH_POINTS_PER_WEIGHT = 160


@dataclass(frozen=True)
class Node:
    """One broker address. ``host`` is an IP once resolved; ``domain`` keeps the name.

    ``addr`` (``host:port``, IPv6 bracketed, as APISIX prints nodes) and
    ``dial_host`` are computed once: every session logs and records ``addr``.
    """

    host: str
    port: int
    weight: int = 1
    priority: int = 0
    domain: str = field(default=None, compare=False)
    addr: str = field(init=False, compare=False, repr=False)
    dial_host: str = field(init=False, compare=False, repr=False)

    def __post_init__(self):
        host = self.host
        if ":" in host and not host.startswith("["):
            host = "[%s]" % host
        object.__setattr__(self, "addr", "%s:%d" % (host, self.port))
        # without IPv6 brackets, for socket.connect
        object.__setattr__(self, "dial_host", self.host.strip("[]"))


def _reduced_weights(nodes):
    g = 0
    for node in nodes:
        g = math.gcd(g, node.weight)
    g = g or 1  # all weights zero: resty.chash takes the gcd as 1
    return [node.weight // g for node in nodes]


class ChashRing:
    """APISIX's consistent-hash ring (resty.chash, CRC-32 points)."""

    def __init__(self, nodes):
        self.nodes = list(nodes)
        points = []
        for node, weight in zip(self.nodes, _reduced_weights(self.nodes)):
            node_id = node.addr.replace(":", "\0").encode()
            base = zlib.crc32(node_id)
            prev = 0
            for _ in range(CHASH_POINTS_PER_WEIGHT * weight):
                prev = zlib.crc32(struct.pack("<I", prev), base)
                points.append((prev, node))
        points.sort(key=lambda p: p[0])
        self._hashes = [p[0] for p in points]
        self._owners = [p[1] for p in points]

    def pick(self, key, tried=()):
        """First point whose hash is >= CRC32(key), wrapping; skip tried nodes."""
        npoints = len(self._hashes)
        if not npoints:
            return None
        start = bisect.bisect_left(self._hashes, zlib.crc32(key))
        for step in range(npoints):
            node = self._owners[(start + step) % npoints]
            if node not in tried:
                return node
        return None


class KetamaRing:
    """uhashring's ketama ring, weighted; an opt-in for fleets not shared with APISIX."""

    def __init__(self, nodes):
        from uhashring import HashRing  # imported lazily: only this opt-in needs it

        self.nodes = list(nodes)
        self._by_name = {node.addr: node for node in self.nodes if node.weight > 0}
        self._ring = HashRing(
            nodes={name: {"weight": node.weight} for name, node in self._by_name.items()},
            hash_fn="ketama")

    def pick(self, key, tried=()):
        if not self._by_name:
            return None
        for name in self._ring.range(key.decode("latin-1"), unique=True):
            node = self._by_name[name["nodename"]]
            if node not in tried:
                return node
        return None


class RoundRobin:
    """Weighted round robin (resty.roundrobin): gcd steps, random start."""

    def __init__(self, nodes, rng=random):
        self.nodes = list(nodes)
        self._weights = _reduced_weights(self.nodes)
        self._max = max(self._weights, default=0)
        self._index = rng.randrange(len(self.nodes)) if self.nodes else 0
        self._current = self._max  # resty.roundrobin starts at cw = max weight

    def _next(self):
        n = len(self.nodes)
        while True:
            self._index = (self._index + 1) % n
            if self._index == 0:
                self._current -= 1
                if self._current <= 0:
                    self._current = self._max
            if self._weights[self._index] >= self._current:
                return self.nodes[self._index]

    def pick(self, key=None, tried=()):
        # A full weighted cycle visits every node with weight > 0 at least once.
        for _ in range(sum(self._weights) + len(self.nodes)):
            node = self._next()
            if node not in tried:
                return node
        return None


PICKERS = {"roundrobin": RoundRobin, "chash": ChashRing}
#: Every type APISIX has a balancer module for; any other is refused at dial.
TYPES = ("roundrobin", "chash", "least_conn", "ewma")


def _factory(kind, ring, name, shared):
    """``make(nodes, priority)`` for one priority group's picker."""
    if kind == "least_conn":
        return lambda nodes, prio: loadaware.LeastConn(nodes, shared.least_conn_state(name, prio))
    if kind == "ewma":
        return lambda nodes, prio: loadaware.Ewma(nodes, shared.ewma, shared.rng)
    if kind == "chash" and ring == "ketama":
        return lambda nodes, prio: KetamaRing(nodes)
    picker = PICKERS.get(kind, RoundRobin)
    return lambda nodes, prio: picker(nodes)


class Balancer:
    """The nodes of one upstream, grouped by priority, behind one picker each.

    Lives as long as the route table snapshot, so round-robin position is
    shared by all sessions of that upstream, as in APISIX.  ``name`` (the
    upstream's resource key) and ``shared`` (a ``loadaware.Shared``) give
    least_conn and ewma the state that outlives a table swap; without them
    that state is private to this balancer.
    """

    def __init__(self, nodes, kind="roundrobin", ring="apisix", name=None, shared=None):
        self.nodes = list(nodes)
        self.kind = kind
        make = _factory(kind, ring, name, shared or loadaware.Shared())
        groups = {}
        for node in self.nodes:
            groups.setdefault(node.priority, []).append(node)
        self._groups = [make(groups[p], p) for p in sorted(groups, reverse=True)]
        self._counting = {node: picker for picker in self._groups
                          if getattr(picker, "counts", False) for node in picker.nodes}

    def acquire(self, node):
        """Count a session on ``node`` (least_conn); returns the release callable, or None."""
        picker = self._counting.get(node)
        if picker is None:
            return None
        picker.acquire(node)
        return lambda: picker.release(node)

    def observe(self, node, seconds):
        """A dial to ``node`` connected after ``seconds``: ewma's latency sample."""
        if self.kind == "ewma" and self._groups:
            self._groups[0].table.observe(node.addr, seconds)

    def candidates(self, key, tries, unhealthy=()):
        """Yield up to ``tries`` distinct nodes in the order to dial them.

        Nodes whose ``addr`` is in ``unhealthy`` are skipped as if already
        tried (chash walks on along the ring), unless every node is
        unhealthy: then all are candidates, as APISIX falls back to the
        whole node list rather than refuse.
        """
        if len(self.nodes) == 1:  # APISIX bypasses the balancer for one node (dial
            yield self.nodes[0]  # still counts a least_conn session: acquire())
            return
        skip = set()
        if unhealthy:
            skip = {node for node in self.nodes if node.addr in unhealthy}
            if len(skip) == len(self.nodes):
                skip = set()
        tried = set(skip)
        for picker in self._groups:
            while len(tried) - len(skip) < tries:
                node = picker.pick(key, tried)
                if node is None:
                    break
                tried.add(node)
                yield node
