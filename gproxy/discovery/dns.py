"""DNS service discovery: resolve each ``service_name`` in the background, by TTL.

``DnsResolver`` turns a name into ``model.discovery.Record`` s the way
APISIX's dns client does (record types tried in ``order``, ``last`` first
when known; SRV targets resolved to their addresses).  ``DnsDiscovery``
keeps one greenlet per wanted name: it resolves, sleeps for the answer's TTL
(between ``MIN_TTL`` and ``MAX_TTL``), resolves again.  When the node list
of a name changes it calls ``on_change()`` once (coalesced): the runtime
then rebuilds the route table from the store and the answers, like an Admin
write.  When every DNS server fails the last good answer stays (retried
after ``RETRY`` seconds, doubling up to ``MAX_RETRY``); an authoritative
"no such name" or "no records" empties the node list.  Sessions never wait
on DNS: they use whatever the current table holds.  A live upgrade's new
process starts from the old one's last good answers (``seed``), so it
serves the same nodes even when the DNS is down as it starts.  Never touches the data
path, the store or the Admin API.
"""

import ipaddress
import logging

import gevent

from gproxy.discovery.dnsclient import DnsClient, DnsFailure, NoSuchName
from gproxy.model import discovery as model

log = logging.getLogger("gproxy.discovery")
MIN_TTL, MAX_TTL = 1.0, 3600.0
EMPTY_TTL = 30.0  # seconds before a name without records is asked again
RETRY, MAX_RETRY = 1.0, 30.0
MAX_CNAMES = 8


class DnsResolver:
    def __init__(self, client, order=model.DEFAULT_ORDER, ipv6=True):
        self.client = client
        self.order = [t for t in order if ipv6 or t != "AAAA"]
        self.last = {}  # name -> the type that answered last time ("last" in order)

    def resolve(self, host, depth=0):
        """``(records, ttl)`` for ``host``; DnsFailure when nothing could be learnt."""
        if _is_ip(host):  # an address literal is its own answer, as in APISIX's client
            return [model.Record(host)], MAX_TTL
        try:
            for rdtype in self._types(host):
                records, ttl = self._lookup(host, rdtype, depth)
                if records:
                    self.last[host] = rdtype
                    return records, ttl
        except NoSuchName:
            pass
        return [], EMPTY_TTL

    def _types(self, host):
        out = []
        for rdtype in self.order:
            rdtype = self.last.get(host) if rdtype == "last" else rdtype
            if rdtype is not None and rdtype not in out:
                out.append(rdtype)
        return out

    def _lookup(self, host, rdtype, depth):
        answer = self.client.lookup(host, rdtype)
        if rdtype in ("A", "AAAA"):
            return [model.Record(r.address) for r in answer.records], answer.ttl
        if rdtype == "SRV" and answer.records:
            return self._srv(answer)
        if rdtype == "CNAME" and answer.records and depth < MAX_CNAMES:
            records, ttl = self.resolve(str(answer.records[0].target), depth + 1)
            return records, min(ttl, answer.ttl)
        return [], answer.ttl

    def _srv(self, answer):
        targets, ttl = [], answer.ttl
        for srv in answer.records:
            target = str(srv.target)
            addresses = []
            for rdtype in [t for t in ("A", "AAAA") if t in self.order]:
                try:
                    found = self.client.lookup(target, rdtype)
                except NoSuchName:
                    break
                addresses = [r.address for r in found.records]
                if addresses:
                    ttl = min(ttl, found.ttl)
                    break
            if not addresses:  # APISIX fails the whole lookup
                raise DnsFailure("failed to resolve SRV record %s: no address" % target)
            targets.append((srv.priority, srv.weight, srv.port, addresses))
        return model.srv_records(targets), ttl


class DnsDiscovery:
    """The last good nodes of every wanted ``service_name``, kept fresh in the background."""

    def __init__(self, resolver, on_change):
        self.resolver = resolver
        self.on_change = on_change
        self.found = {}  # service_name -> nodes (APISIX's array form)
        self.errors = {}  # service_name -> the last failure, while it lasts
        self._ttl = {}  # service_name -> seconds its last answer lives
        self._watchers = {}
        self._users = {}  # (kind, id) -> the service_name it looks up
        self._running = False
        self._change = None

    def apply(self, data):
        """``data`` (the store's whole ``{kind: [value, ...]}``) with the dns upstreams'
        nodes filled in; follows the names they want."""
        self._users = {}
        self.fill_changes([(kind, str(value.get("id")), value)
                           for kind in ("upstreams", "stream_routes")
                           for value in data.get(kind) or ()])
        return model.with_nodes(data, self.found)

    def fill_changes(self, changes):
        """Store changes ``(kind, id, value)`` with the dns upstreams' nodes filled in;
        follows the names the changed objects want now."""
        out = []
        for kind, id_, value in changes:
            if id_ is not None and kind in ("upstreams", "stream_routes"):
                name = None if value is None else model.item_service(kind, value)
                if name is None:
                    self._users.pop((kind, id_), None)
                else:
                    self._users[(kind, id_)] = name
                    value = model.fill_item(kind, value, self.found)
            out.append((kind, id_, value))
        self.want(set(self._users.values()))
        return out

    def seed(self, found):
        """A previous process's last good answers (``found``, as ``self.found``), for
        the names this one wants and has none for yet; a fresh answer replaces them."""
        fresh = {name: nodes for name, nodes in found.items()
                 if name in self._watchers and name not in self.found}
        if fresh:
            self.found.update(fresh)
            self._changed()

    def users(self):
        """``(kind, id)`` of every stored object whose nodes come from DNS."""
        return list(self._users)

    def want(self, names):
        for name in set(self._watchers) - names:
            watcher = self._watchers.pop(name)
            if watcher is not None:
                watcher.kill(block=False)
            for known in (self.found, self.errors, self._ttl):
                known.pop(name, None)
        for name in names - set(self._watchers):
            self._watchers[name] = gevent.spawn(self._watch, name) if self._running else None

    def prime(self, timeout):
        """Resolve every wanted name once now (start-up), waiting at most ``timeout`` s."""
        jobs = [gevent.spawn(self._refresh, name) for name in list(self._watchers)]
        gevent.joinall(jobs, timeout=timeout)
        gevent.killall(jobs, block=False)
        if self._change is not None:  # the table rebuild they asked for, before serving
            self._change.join(timeout)

    def start(self):
        self._running = True
        for name, watcher in list(self._watchers.items()):
            if watcher is None:
                self._watchers[name] = gevent.spawn(self._watch, name, primed=name in self.found)

    def stop(self):
        self._running = False
        gevent.killall([w for w in self._watchers.values() if w is not None], block=False)
        self._watchers = dict.fromkeys(self._watchers)

    def _watch(self, name, primed=False):
        delay = self._ttl.get(name, MIN_TTL) if primed else 0
        while True:
            gevent.sleep(delay)
            delay = self._refresh(name)

    def _refresh(self, name):
        """Resolve ``name`` once; returns the seconds until the next time."""
        host, _ = model.split_service(name)
        try:
            records, ttl = self.resolver.resolve(host)
        except DnsFailure as exc:
            return self._failed(name, str(exc))
        if name in self.errors:
            log.warning("dns discovery: %s resolves again", name)
            del self.errors[name]
        nodes = model.nodes(name, records)
        if nodes != self.found.get(name):
            log.warning("dns discovery: %s -> %s", name, _shown(nodes))
            self.found[name] = nodes
            self._changed()
        self._ttl[name] = min(max(float(ttl), MIN_TTL), MAX_TTL)
        return self._ttl[name]

    def _failed(self, name, error):
        previous = self.errors.get(name)
        retry = RETRY if previous is None else min(previous[1] * 2, MAX_RETRY)
        if previous is None or previous[0] != error:
            kept = self.found.get(name)
            log.error("dns discovery: %s: %s; %s", name, error,
                      "keeping the last good answer (%d nodes)" % len(kept) if kept is not None
                      else "no answer yet")
        self.errors[name] = (error, retry)
        return retry

    def _changed(self):
        if self._change is None:  # one table rebuild for many names changing at once
            self._change = gevent.spawn(self._apply_change)

    def _apply_change(self):
        self._change = None
        self.on_change()


def _is_ip(host):
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _shown(nodes):
    return ", ".join("%s:%s weight=%s%s" % (
        n["host"] if ":" not in n["host"] else "[%s]" % n["host"], n["port"], n["weight"],
        " priority=%d" % n["priority"] if "priority" in n else "") for n in nodes) or "no nodes"


def dns_discovery(servers, on_change, order=model.DEFAULT_ORDER, ipv6=True, **client):
    """A ``DnsDiscovery`` asking ``servers`` (``[(ip, port)]``)."""
    return DnsDiscovery(DnsResolver(DnsClient(servers, **client), order, ipv6), on_change)
