"""One process's live sessions as the Admin API asks for them: query, evict.

``LiveSessions`` puts the registry (records and counters) and the current
route table together behind what the Admin API's extensions call, and the
parent's ``WorkerSet`` offers the same: ``query(spec)`` (filtered, sorted,
one page, with ``total``), ``select(spec)`` (ids, for evictions),
``end_many(ids)``, ``stats()``, ``close``, and
``evictions`` (jobs that end sessions at a rate).

A query ``spec`` is a plain dict (it crosses the workers' control channel):
filters ``route_id``, ``node``, ``client_id`` (substring), ``client_addr``
(an IP or a CIDR), ``state``, ``ids`` (a list), ``misplaced`` (see
``gproxy.model.placement``), ``sort`` (a field of ``SORTS``, ``-`` first for
descending), ``offset`` and ``limit``.  Work over many sessions yields to
the hub between chunks (``pause``), so no admin request holds the data path
for more than about a millisecond whatever the number of sessions.
"""

import heapq
import ipaddress
import itertools
import operator
from collections import Counter

from gproxy import hub
from gproxy.model.placement import Placement
from gproxy.model.routes import RouteTable
from gproxy.protocols.mqttstream import USE_ANOTHER_SERVER
from gproxy.proxy.sessions.evict import Evictions
from gproxy.proxy.sessions.registry import STATES

SORTS = ("connected_at", "bytes_in", "bytes_out", "client_id")
CHUNK = 128          # sessions looked at between two chances to yield


def sort_order(text):
    """``"-bytes_in"`` -> ``("bytes_in", True)``; ValueError for an unknown field."""
    text = text or "connected_at"
    field, reverse = (text[1:], True) if text.startswith("-") else (text, False)
    if field not in SORTS:
        raise ValueError("invalid sort: %s" % text)
    return field, reverse


def record_key(field):
    """Sort key of a SessionInfo (``client_id`` None sorts as empty)."""
    if field == "client_id":
        return lambda info: info.client_id or ""
    return operator.attrgetter(field)


def dict_key(field):
    """The same key on the records' dicts (for merging workers' pages)."""
    if field == "client_id":
        return lambda item: item["client_id"] or ""
    return operator.itemgetter(field)


def merge_pages(replies, spec, pause=hub.pause):
    """One page from several sources' first ``offset + limit`` matches, each sorted
    as ``spec`` says (workers of one process, or instances of a fleet): a heap
    merge, ties in source order, totals and ``per_node`` summed.  A deep page
    merges thousands of items: the data path gets the hub every ``CHUNK``."""
    field, reverse = sort_order(spec.get("sort"))
    offset, limit = spec.get("offset", 0), spec.get("limit")
    merged = heapq.merge(*(r["list"] for r in replies), key=dict_key(field), reverse=reverse)
    stop = None if limit is None else offset + limit
    page = []
    for n, item in enumerate(itertools.islice(merged, stop), 1):
        if n > offset:
            page.append(item)
        if n % CHUNK == 0:
            pause()
    out = {"total": sum(r["total"] for r in replies), "list": page}
    if spec.get("misplaced"):
        per_node = Counter()
        for reply in replies:
            per_node.update(reply.get("per_node") or {})
        out["per_node"] = dict(per_node)
    return out


def check_spec(spec):
    """Raise ValueError (worded for the Admin API) for a filter that cannot match."""
    sort_order(spec.get("sort"))
    if spec.get("state") is not None and spec["state"] not in STATES:
        raise ValueError("invalid state: %s, expect one of %s" % (spec["state"],
                                                                   ", ".join(STATES)))
    addr = spec.get("client_addr")
    if addr:
        try:
            ipaddress.ip_network(addr, strict=False)
        except ValueError:
            raise ValueError("invalid client_addr: %s" % addr) from None


def _addr_check(text):
    if "/" not in text:
        return lambda info: info.client_addr == text
    net = ipaddress.ip_network(text, strict=False)
    seen = {}  # client address -> inside; parsing an address costs ~2 us, a lookup ~50 ns

    def inside(info):
        addr = info.client_addr
        found = seen.get(addr)
        if found is None:
            try:
                found = seen[addr] = ipaddress.ip_address(addr) in net
            except ValueError:
                found = seen[addr] = False
        return found
    return inside


def where_for(spec, placement=None):
    """A predicate over SessionInfo for the filters in ``spec`` (None: all)."""
    checks = []
    for name in ("route_id", "node", "state"):
        if spec.get(name) is not None:
            want = str(spec[name])
            checks.append(lambda info, n=name, w=want: getattr(info, n) == w)
    if spec.get("client_id"):
        part = spec["client_id"]
        checks.append(lambda info: part in (info.client_id or ""))
    if spec.get("client_addr"):
        checks.append(_addr_check(spec["client_addr"]))
    if spec.get("ids") is not None:
        ids = set(spec["ids"])
        checks.append(lambda info: info.id in ids)
    if spec.get("misplaced") and placement is not None:
        checks.append(placement.misplaced)
    if not checks:
        return None
    if len(checks) == 1:
        return checks[0]
    return lambda info: all(check(info) for check in checks)


class LiveSessions:
    """The sessions of this process, for the Admin API (or a worker's control channel)."""

    def __init__(self, registry, table=None, pause=hub.pause, grace=5.0,
                 server_reference=None):
        self.registry = registry
        self._table = table or RouteTable
        self.pause = pause
        self.grace = grace
        self.server_reference = server_reference
        self.evictions = Evictions(self.select, self.end_many)

    # -- reading -----------------------------------------------------------
    def query(self, spec):
        """``{"total", "list"[, "per_node"]}``: the page ``spec`` asks for."""
        check_spec(spec)
        field, reverse = sort_order(spec.get("sort"))
        placement = Placement(self._table()) if spec.get("misplaced") else None
        offset, limit = spec.get("offset", 0), spec.get("limit")
        total, first, per_node = self.registry.query(
            where_for(spec, placement), record_key(field), reverse,
            None if limit is None else offset + limit,
            tally=operator.attrgetter("node") if placement else None, pause=self.pause,
            every=CHUNK)
        items = []
        for start in range(offset, len(first), CHUNK):
            for info in first[start:start + CHUNK]:
                item = info.as_dict()
                if placement is not None:
                    item["move_to"] = placement.check(info)[1]
                items.append(item)
            self.pause()
        out = {"total": total, "list": items}
        if per_node is not None:
            out["per_node"] = dict(per_node)
        return out

    def select(self, spec):
        """Ids of the sessions ``spec`` matches now, oldest first."""
        check_spec(spec)
        placement = Placement(self._table()) if spec.get("misplaced") else None
        _, found, _ = self.registry.query(where_for(spec, placement), pause=self.pause,
                                          every=CHUNK)
        return [info.id for info in found]

    def stats(self):
        return self.registry.stats()

    def __len__(self):
        return len(self.registry)

    # -- acting ------------------------------------------------------------
    def close(self, session_id):
        return self.registry.close(session_id)

    def end_many(self, ids, code=USE_ANOTHER_SERVER, grace=None, server_reference=None):
        """End each live session of ``ids`` cleanly; ``{"ended": n, "failed": 0}``."""
        grace = self.grace if grace is None else grace
        ref = self.server_reference if server_reference is None else server_reference
        ended = 0
        for start in range(0, len(ids), CHUNK):
            if start:
                self.pause()
            for sid in ids[start:start + CHUNK]:
                ended += self.registry.end(sid, code, grace, ref)
        return {"ended": ended, "failed": 0}
