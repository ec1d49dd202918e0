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

Costs are bounded whatever the weights: a ring holds at most
``MAX_RING_POINTS`` points (the Admin checks refuse more, ``ring_points``
counts them), in two flat arrays (6 bytes a point), and is built in steps
with ``pause()`` between them, so a caller on the hub lets the data path run
while a big ring is built; round robin skips tried nodes in one pass over
the nodes, not one step per unit of weight.
"""

import bisect
import math
import random
import zlib
from array import array
from dataclasses import dataclass, field

from gproxy.model import loadaware

#: resty.chash gives every node 160 points per unit of (gcd-reduced) weight.
CHASH_POINTS_PER_WEIGHT = 160
#: gproxy's bound on one upstream's rings (APISIX has none: one ``weight: 100000``
#: beside a weight 1 made resty.chash build 16 million points): 1,024 units of
#: gcd-reduced weight, e.g. 1,000 nodes of weight 1, or 10 nodes of weights up to 100.
MAX_RING_POINTS = CHASH_POINTS_PER_WEIGHT * 1024
STEP = 512  # ring points built between two pauses


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


def reduce_weights(weights):
    """Weights divided by their gcd (all zero: the gcd is taken as 1, as resty.chash)."""
    g = 0
    for weight in weights:
        g = math.gcd(g, weight)
    g = g or 1
    return [weight // g for weight in weights]


def _reduced_weights(nodes):
    return reduce_weights([node.weight for node in nodes])


def ring_points(groups):
    """Points the rings of one upstream hold: ``groups`` are the weights of each
    priority group (one ring per group, each reduced by its own gcd)."""
    return sum(CHASH_POINTS_PER_WEIGHT * sum(reduce_weights(weights)) for weights in groups)


def _no_pause():
    pass


class ChashRing:
    """APISIX's consistent-hash ring (resty.chash, CRC-32 points).

    Points go into 256 buckets by their top byte as they are made, and each
    bucket is sorted on its own: every step between two ``pause()`` calls is
    short, whatever the ring's size.  A point is ``hash << bits | node index``,
    so equal hashes keep node order, as the stable sort of resty.chash's
    points did.
    """

    def __init__(self, nodes, pause=None):
        self.nodes = list(nodes)
        pause = pause or _no_pause
        bits = max(16, len(self.nodes).bit_length())
        buckets = [[] for _ in range(256)]
        made = 0
        for index, (node, weight) in enumerate(zip(self.nodes, _reduced_weights(self.nodes))):
            base = zlib.crc32(node.addr.replace(":", "\0").encode())
            prev = 0
            for _ in range(CHASH_POINTS_PER_WEIGHT * weight):
                prev = zlib.crc32(prev.to_bytes(4, "little"), base)
                buckets[prev >> 24].append(prev << bits | index)
                made += 1
                if made % STEP == 0:
                    pause()
        self._hashes, self._owners = array("I"), array("H" if bits == 16 else "I")
        mask = (1 << bits) - 1
        for bucket in buckets:
            bucket.sort()
            self._hashes.extend(point >> bits for point in bucket)
            self._owners.extend(point & mask for point in bucket)
            if len(bucket) > STEP // 4:
                pause()

    def __len__(self):
        return len(self._hashes)

    def owners(self):
        """The node of each point, in ring order."""
        return [self.nodes[index] for index in self._owners]

    def pick(self, key, tried=()):
        """First point whose hash is >= CRC32(key), wrapping; skip tried nodes."""
        npoints = len(self._hashes)
        if not npoints:
            return None
        start = bisect.bisect_left(self._hashes, zlib.crc32(key))
        if not tried:
            return self.nodes[self._owners[start % npoints]]
        if all(node in tried for node in self.nodes):
            return None
        for step in range(npoints):
            node = self.nodes[self._owners[(start + step) % npoints]]
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
    """Weighted round robin (resty.roundrobin): gcd steps, random start.

    The sequence visits the nodes in order at a current weight that drops by
    one each time the index wraps (back to the largest weight below 1); a
    node is picked where its weight is at least the current one.  Skipping
    tried nodes jumps straight to the next level where an untried node
    qualifies, so a retry costs one pass over the nodes even beside a
    ``weight: 1000000000``.
    """

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
        if not self.nodes:
            return None
        if not tried:
            return self._next()
        untried = [i for i, node in enumerate(self.nodes) if node not in tried]
        if not untried:
            return None
        if self._max == 0:  # every weight 0: plain round robin over every node
            after = [i for i in untried if i > self._index]
            self._index = (after or untried)[0]
            return self.nodes[self._index]
        for i in untried:  # the rest of the current level
            if i > self._index and self._weights[i] >= self._current:
                self._index = i
                return self.nodes[i]
        best = max(self._weights[i] for i in untried)
        if best < 1:
            return None  # weight 0 beside positive weights: never picked
        level = self._current - 1 if self._current > 1 else self._max
        self._current = min(level, best)
        self._index = next(i for i in untried if self._weights[i] >= self._current)
        return self.nodes[self._index]


PICKERS = {"roundrobin": RoundRobin, "chash": ChashRing}
#: Every type APISIX has a balancer module for; any other is refused at dial.
TYPES = ("roundrobin", "chash", "least_conn", "ewma")


def _factory(kind, ring, name, shared, pause):
    """``make(nodes, priority)`` for one priority group's picker (``pause``: called
    while a ring is built)."""
    if kind == "least_conn":
        return lambda nodes, prio: loadaware.LeastConn(nodes, shared.least_conn_state(name, prio))
    if kind == "ewma":
        return lambda nodes, prio: loadaware.Ewma(nodes, shared.ewma, shared.rng)
    if kind == "chash":
        if ring == "ketama":
            return lambda nodes, prio: KetamaRing(nodes)
        return lambda nodes, prio: ChashRing(nodes, pause)
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

    def __init__(self, nodes, kind="roundrobin", ring="apisix", pause=None, name=None,
                 shared=None):
        self.nodes = list(nodes)
        self.kind = kind
        self.ring = ring
        make = _factory(kind, ring, name, shared or loadaware.Shared(), pause)
        groups = {}
        for node in self.nodes:
            groups.setdefault(node.priority, []).append(node)
        self._groups = [make(groups[p], p) for p in sorted(groups, reverse=True)]
        self._counting = {node: picker for picker in self._groups
                          if getattr(picker, "counts", False) for node in picker.nodes}

    def same_as(self, nodes, kind, ring):
        """Whether this balancer already is what ``Balancer(nodes, kind, ring)``
        would build (a table swap then keeps it: its ring, its round-robin place;
        least_conn counts and ewma latencies live in ``shared`` anyway)."""
        return self.nodes == list(nodes) and self.kind == kind and self.ring == ring

    def acquire(self, node):
        """Count a session on ``node`` (least_conn); returns the release callable, or None."""
        picker = self._counting.get(node)
        if picker is None:
            return None
        return picker.acquire(node)

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
