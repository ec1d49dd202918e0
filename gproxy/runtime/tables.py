"""The live route table and TLS certificates, kept in step with the store.

``Tables.apply(changes)`` turns one group of store changes into the next
route table (``RouteTable.updated``: what did not change is the same object,
with its balancer, ring, round-robin position and health), attaches health
checkers to the upstreams that changed, rebuilds the certificate index only
when an ``ssls`` object changed, and swaps the references the data path
reads.  Building pauses for the data path (``gproxy.hub.pause``), so groups
are applied one at a time, in the order they come: a second group must not
start from a table the first is about to replace.

Changes here are plain data, ``(kind, id, value)`` (``value`` None: deleted)
or ``(kind, None, [id, ...])`` (a new load order), so a worker, which has no
store, applies what its parent sends the same way (``plain`` makes them
from the store's records).
"""

import logging

from gevent.lock import Semaphore

from gproxy import hub
from gproxy.model.routes import RouteTable

log = logging.getLogger("gproxy.server")


def plain(changes, store):
    """Store changes (records) as plain data, a reorder with the store's new order."""
    out = []
    for kind, id_, record in changes:
        if id_ is None:
            out.append((kind, None, [r.id for r in store.list(kind)]))
        else:
            out.append((kind, id_, None if record is None else record.value))
    return out


def checked_names(changes):
    """The health-check names of the upstreams ``changes`` may touch."""
    names = set()
    for kind, id_, _ in changes:
        if id_ is not None and kind in ("upstreams", "stream_routes"):
            names.add("/apisix/%s/%s" % (kind, id_))
    return names


class Tables:
    """What the data path reads from the store, updated one group of changes at a time."""

    def __init__(self, gp, pause=hub.pause):
        self.gp = gp
        self.pause = pause
        self.ssls = {}  # id -> value, in load order: the certificate index's input
        self._lock = Semaphore()
        self._incoming = []  # a whole table arriving in parts (a worker's resync)

    def build(self, data):
        """The first table and certificates, from ``{kind: [value, ...]}``."""
        cfg = self.gp.cfg
        table = RouteTable(data["stream_routes"], data["upstreams"],
                           cfg["gproxy.balancer.chash_ring"], shared=self.gp.balancing)
        self.gp.health.sync(table)
        self.ssls = {str(v.get("id")): v for v in data.get("ssls") or ()}
        return table, self._certs(None)

    def _certs(self, previous):
        from gproxy.proxy.accept.tlsctx import Certificates
        return Certificates(list(self.ssls.values()),
                            self.gp.cfg["apisix.ssl.ssl_trusted_certificate"], previous)

    def apply(self, changes):
        """Make ``changes`` live (waits for a group being applied to finish first)."""
        with self._lock:
            proxy = self.gp.proxy
            table = proxy.table.updated(changes, self.pause)
            self.gp.health.sync(table, checked_names(changes))
            ssls = [c for c in changes if c[0] == "ssls"]
            certs = self._certs(proxy.certs) if self._update_ssls(ssls) else proxy.certs
            proxy.table, proxy.certs = table, certs
            log.info("route table updated: changes=%d routes=%d upstreams=%d",
                     len(changes), len(table.routes), len(table.upstreams))

    def take(self, changes, first, last):
        """One part of the whole table (a worker's resync); applied with the last part."""
        if first:
            self._incoming = []
        self._incoming.extend(changes)
        if last:
            items, self._incoming = self._incoming, []
            self.replace_all(items)

    def replace_all(self, items):
        """Make ``items`` (every object, in load order) the whole table: what is not in
        it goes, and what did not change keeps its balancer."""
        present = {"upstreams": [], "stream_routes": [], "ssls": []}
        for kind, id_, _ in items:
            present[kind].append(id_)
        table, changes = self.gp.proxy.table, list(items)
        for kind, current in (("upstreams", table.upstreams), ("stream_routes", table.route_ids()),
                              ("ssls", self.ssls)):
            keep = set(present[kind])
            changes += [(kind, id_, None) for id_ in current if id_ not in keep]
        changes += [("stream_routes", None, present["stream_routes"]),
                    ("ssls", None, present["ssls"])]
        self.apply(changes)

    def _update_ssls(self, changes):
        for _, id_, value in changes:
            if id_ is None:
                self.ssls = {i: self.ssls[i] for i in value if i in self.ssls}
            elif value is None:
                self.ssls.pop(id_, None)
            else:
                self.ssls[id_] = value
        return bool(changes)
