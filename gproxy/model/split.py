"""The sticky traffic split: which side of a route's split a client belongs on.

gproxy's ``traffic_split`` in a route's mqtt-proxy conf (docs/routing.md)
lists upstreams with weights, like APISIX's traffic-split
``weighted_upstreams``; an entry without ``upstream_id`` is the route's own
upstream.  Unlike traffic-split (a weighted random pick per HTTP request),
the side is a function of the client's key (its client id by default): the
key's 64-bit hash ``h`` (BLAKE2b, 8 bytes, personalisation
``gproxy-split``, of ``salt``, a NUL byte and the key) is a point in [0, 1),
``h / 2**64``, and entry ``i`` owns the slice from the sum of the weights
before it to that sum plus its own, over the total.  So a device lands on the
same side on every reconnect and every gproxy, and moving weight from one
entry to its neighbour moves only the devices between the two slices (10% ->
20% to a canary listed first moves 10% of devices, all from the old side).
The hash is independent of the chash ring's CRC-32, so the devices a split
takes away leave the old ring evenly.

A side whose upstream has health checks and no healthy node gives its
clients to the next entry (in list order, wrapping) that has one; with none
healthy anywhere the hashed side is kept, and its balancer tries every node
as APISIX does.  Pure: the caller says which upstreams are healthy.
"""

import bisect
import hashlib

PERSON = b"gproxy-split"


def point(salt, key):
    """The key's 64-bit hash (salt and key as bytes)."""
    digest = hashlib.blake2b(salt + b"\0" + key, digest_size=8, person=PERSON).digest()
    return int.from_bytes(digest, "big")


class Split:
    """One route's split: ``side(key)`` and ``choose(key, healthy)`` give an upstream id
    (None: the route's own upstream)."""

    __slots__ = ("key", "salt", "upstream_ids", "weights", "bounds", "total")

    def __init__(self, conf):
        self.key = conf.get("key", "mqtt_client_id")
        self.salt = conf.get("salt", "").encode("utf-8", "surrogatepass")
        entries = conf["weighted_upstreams"]
        self.upstream_ids = tuple(None if e.get("upstream_id") is None else str(e["upstream_id"])
                                  for e in entries)
        self.weights = tuple(e.get("weight", 1) for e in entries)
        bounds, total = [], 0
        for weight in self.weights:
            total += weight
            bounds.append(total)
        self.bounds = tuple(bounds)
        self.total = total

    def index(self, key):
        """The entry ``key`` (bytes) hashes to; None when every weight is 0."""
        if not self.total:
            return None
        slot = (point(self.salt, key) * self.total) >> 64  # floor(h / 2**64 * total)
        return bisect.bisect_right(self.bounds, slot)

    def side(self, key):
        found = self.index(key)
        return None if found is None else self.upstream_ids[found]

    def choose(self, key, healthy):
        """``(upstream id, failed over)``: the hashed side, or the next one with a
        healthy node when ``healthy(upstream_id)`` says it has none."""
        first = self.index(key)
        if first is None:
            return None, False
        count = len(self.upstream_ids)
        for step in range(count):
            i = (first + step) % count
            if self.weights[i] or step == 0:
                if healthy(self.upstream_ids[i]):
                    return self.upstream_ids[i], step > 0
        return self.upstream_ids[first], False


def split_upstream(table, route, key):
    """``(upstream, failed over, error line)`` for a client of ``route`` (which has
    a split) in route table ``table``: the side ``key`` (bytes) hashes to, or
    the next one with a healthy node (``Upstream.healthy``)."""
    own, err = table.upstream_for(route)
    sides = {None: own}
    for upstream_id in route.split.upstream_ids:
        if upstream_id is not None:
            sides[upstream_id] = table.upstreams.get(upstream_id)
    chosen, failed_over = route.split.choose(
        key, lambda uid: sides[uid] is not None and sides[uid].healthy())
    if chosen is None:
        return own, failed_over, err
    if sides[chosen] is None:
        return None, False, "failed to find upstream by id: %s" % chosen
    return sides[chosen], failed_over, None
