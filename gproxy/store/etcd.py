"""EtcdStore: stream routes, upstreams and ssls shared on etcd, the way APISIX keeps them.

Keys are APISIX's (``<prefix>/stream_routes/<id>``, ``<prefix>/upstreams/<id>``),
values APISIX's JSON, so gproxy instances, APISIX and ``etcdctl`` can all write
the same routes.  POST ids come from etcd as APISIX makes them (put
``<prefix>/gen_id``, take the revision, zero-pad to 20 digits), and
``createdIndex``/``modifiedIndex`` are the keys' create and mod revisions.

Reads come from an in-memory copy.  An Admin write goes to etcd first, then
updates the copy and tells the subscribers before the Admin API answers; if
etcd cannot be reached the write fails with APISIX's 503 error and nothing
changes.  A watch thread keeps the copy current with every other writer: it
resumes from the revision after the last event it saw, reloads everything
when that revision was compacted, and retries while etcd is down, so an
outage leaves the last known routes serving.  Events reach the hub through
an async watcher (thread-safe), and are applied there by one greenlet,
newest revision wins, pausing between events (each is decoded within
``jsontext``'s bounds and checked), so a burst of thousands of events or a
full reload never holds the hub; subscribers hear only what changed.
Invalid values are logged in APISIX's words and skipped (a key keeps its
last valid value), as APISIX's config_etcd does.  Private keys are written
encrypted with APISIX's keyring and read back through it (``keyring``); the
copy holds them as given.

The watch covers the whole prefix (``etcdwatch``), as APISIX's does; changes
to keys that are not routes, upstreams or ssls (the fleet's instances and
eviction jobs) go, in revision order, to whoever asked with ``watch_keys``,
after every route change that came before them has been applied.
"""

import collections
import json
import logging
from dataclasses import dataclass

import gevent

from gproxy.errors import SchemaError
from gproxy.model import jsontext
from gproxy.model.ssls import redacted
from gproxy.protocols.text import printable
from gproxy import hub
from gproxy.store.base import KINDS, Record, Store, check_item, diff
from gproxy.store.etcdclient import Cluster, blocking
from gproxy.store.etcdwatch import PrefixWatch, text

log = logging.getLogger("gproxy.store")


@dataclass
class EtcdRecord(Record):
    """A record whose key carries the configured prefix, as APISIX answers it."""

    prefix: str = "/apisix"

    @property
    def key(self):
        return "%s/%s/%s" % (self.prefix, self.kind, self.id)


class EtcdStore(Store):
    """The shared store: etcd, with a watched in-memory copy."""

    def __init__(self, hosts, prefix="/apisix", timeout=30, watch_timeout=50,
                 health_check_timeout=10, pause=hub.pause, access=None, keyring=None):
        super().__init__(keyring)
        self._pause = pause
        self.prefix = prefix.rstrip("/")
        self.cluster = Cluster(hosts, timeout, health_check_timeout, access)
        # ssls < stream_routes < upstreams: one range covers the three kinds;
        # other APISIX keys inside it (system_config) are skipped
        self.range = (self.prefix + "/ssls/", self.prefix + "/upstreams0")
        self._tombs = {}  # (kind, id) -> revision of a delete applied here
        self._inbox = collections.deque()  # watch thread -> hub
        self._handlers = []  # (key prefix, callback) from watch_keys
        self._draining = False
        self._wake = None
        body = blocking(self.cluster.range, *self.range)  # raises if etcd is down
        self._apply_reload(body)
        self.revision = int(body["header"]["revision"])
        self._watch = PrefixWatch(self.cluster, self.prefix, self.revision, watch_timeout,
                                  self._deliver, self.range)

    # -- keys and values -----------------------------------------------------
    def _key(self, kind, id_):
        return "%s/%s/%s" % (self.prefix, kind, id_)

    def _split(self, key):
        """``(kind, id)`` for one of our keys, else None."""
        kind, _, id_ = key[len(self.prefix) + 1:].partition("/")
        return (kind, id_) if kind in KINDS and id_ and "/" not in id_ else None

    def _decode(self, kind, id_, raw):
        """The checked value of an etcd value, or None (logged as APISIX does)."""
        try:
            value = jsontext.loads(raw)  # bounded: a watch event is admin input too
        except jsontext.JsonError:
            value = None
        if not isinstance(value, dict):
            # whoever can write etcd chooses the key and value: one escaped line each
            log.error("invalid item data of [%s/%s/%s], val: %s, it should be an object",
                      self.prefix, kind, printable(id_),
                      "(not shown)" if kind == "ssls" else printable(raw[:200]))
            return None
        value["id"] = id_  # APISIX: the key names the object
        try:
            value = self.keyring.open(kind, value)
            check_item(kind, value, self._pause)
        except SchemaError as exc:
            shown = redacted(value)  # no private keys, whatever the kind (as the file codec)
            log.error("failed to check item data of [%s/%s] err:%s ,val: %s",
                      self.prefix, kind, printable(str(exc)), json.dumps(shown)[:500])
            return None
        return value

    # -- the interface -------------------------------------------------------
    def put(self, kind, id_, value):
        id_ = str(id_)
        stored = json.dumps(self.keyring.seal(kind, value), ensure_ascii=False,
                            separators=(",", ":"))
        body = blocking(self.cluster.put, self._key(kind, id_), stored)
        revision = int(body["header"]["revision"])
        prev = body.get("prev_kv")
        created = int(prev["create_revision"]) if prev else revision
        record = EtcdRecord(kind, id_, value, created, revision, self.prefix)
        if self._set(record):
            self._notify([(kind, id_, record)])
        return record, prev is None

    def delete(self, kind, id_):
        id_ = str(id_)
        body = blocking(self.cluster.delete, self._key(kind, id_))
        revision = int(body["header"]["revision"])
        old = self._data[kind].pop(id_, None)
        self._tombs[(kind, id_)] = revision
        if not int(body.get("deleted") or 0):
            if old is not None:  # already gone in etcd; our copy was behind
                self._notify([(kind, id_, None)])
            return None
        if old is None:
            prev = body["prev_kvs"][0]
            old = EtcdRecord(kind, id_, {}, int(prev["create_revision"]),
                             int(prev["mod_revision"]), self.prefix)
        else:
            self._notify([(kind, id_, None)])
        return old

    def new_id(self):
        body = blocking(self.cluster.put, self.prefix + "/gen_id", "1")
        return "%020d" % int(body["header"]["revision"])

    def poll(self):
        """Called by the runtime's store loop: (re)start the watch where it is not running.

        Started here rather than in ``__init__`` so it runs only in the process
        that serves the store (with ``--workers``, the parent, after the fork).
        """
        if not self._watch.alive():
            if self._wake is None:
                self._wake = gevent.get_hub().loop.async_()
                # a greenlet, not the callback itself: subscribers may wait (workers' acks)
                self._wake.start(lambda: gevent.spawn(self._drain))
            self._watch.start()
        return False

    def watch_keys(self, subprefix, callback):
        """Call ``callback(key, value or None, revision)`` on the hub for every change
        under ``<prefix><subprefix>`` (``None``: deleted), in revision order with
        the route changes."""
        self._handlers.append((self.prefix + subprefix, callback))

    def close(self):
        self._watch.stop(gevent.sleep)
        if self._wake is not None:
            self._wake.close()
            self._wake = None
        self.cluster.close()

    # -- applying changes (on the hub) ----------------------------------------
    def _set(self, record):
        """Keep ``record`` unless the copy already has a newer revision of its key."""
        current = self._data[record.kind].get(record.id)
        tomb = self._tombs.get((record.kind, record.id), 0)
        if (current is not None and current.modified_index >= record.modified_index) \
                or tomb >= record.modified_index:
            return False
        self._data[record.kind][record.id] = record
        self._tombs.pop((record.kind, record.id), None)
        return True

    def _apply_event(self, event):
        """Apply one change of a route, upstream or ssl; the changes it makes."""
        kind, id_ = self._split(event.key)
        if event.deleted:
            current = self._data[kind].get(id_)
            if current is None or current.modified_index >= event.revision:
                return []
            del self._data[kind][id_]
            self._tombs[(kind, id_)] = event.revision
            return [(kind, id_, None)]
        value = self._decode(kind, id_, event.value)
        record = None if value is None else EtcdRecord(kind, id_, value, event.created,
                                                       event.revision, self.prefix)
        return [(kind, id_, record)] if record is not None and self._set(record) else []

    def _apply_reload(self, body):
        """Replace the copy with a full range read (keeping newer local writes)."""
        revision = int(body["header"]["revision"])
        fresh = {kind: {} for kind in KINDS}
        for kv in body.get("kvs") or ():
            self._pause()
            parsed = self._split(text(kv["key"]))
            if parsed is None:
                continue
            kind, id_ = parsed
            value = self._decode(kind, id_, text(kv.get("value")))
            old = self._data[kind].get(id_)
            if value is None:
                if old is not None:  # keep serving the last valid value
                    fresh[kind][id_] = old
                continue
            fresh[kind][id_] = EtcdRecord(kind, id_, value, int(kv["create_revision"]),
                                          int(kv["mod_revision"]), self.prefix)
        changes = []
        for kind in KINDS:  # written here after the range was read: keep them
            for id_, record in self._data[kind].items():
                if record.modified_index > revision:
                    fresh[kind][id_] = record
            changes += diff(kind, self._data[kind], fresh[kind], self._pause)
        self._data = fresh
        self._tombs = {k: r for k, r in self._tombs.items() if r > revision}
        return changes

    # -- the watch's deliveries, applied on the hub in order -------------------
    def _deliver(self, op, payload):
        """Watch thread: queue ``payload`` and wake the hub (thread-safe)."""
        self._inbox.append((op, payload))
        wake = self._wake
        if wake is not None:
            wake.send()

    def _drain(self):
        """Apply what the watch delivered, in order: one drain at a time (it pauses
        between events, and another wake must not overtake it)."""
        if self._draining:
            return
        self._draining = True
        try:
            while self._inbox:
                changes = []
                while self._inbox:
                    op, payload = self._inbox.popleft()
                    if op == "reload":
                        changes += self._apply_reload(payload)
                        log.warning("store: reloaded every route and upstream from etcd")
                    else:
                        changes = self._apply_events(payload, changes)
                if changes:
                    self._notify(changes)
        finally:
            self._draining = False

    def _apply_events(self, events, changes):
        """Apply watch events in order (pausing between them); the route changes not
        told yet.  A key of the fleet's goes to its handlers once what came
        before it is live."""
        for event in events:
            self._pause()
            self.revision = max(self.revision, event.revision)
            if self._split(event.key) is not None:
                changes += self._apply_event(event)
                continue
            handlers = [cb for sub, cb in self._handlers if event.key.startswith(sub)]
            if handlers and changes:
                self._notify(changes)
                changes = []
            for callback in handlers:
                self._call(callback, event)
        return changes

    def _call(self, callback, event):
        try:
            callback(event.key[len(self.prefix):], None if event.deleted else event.value,
                     event.revision)
        except Exception:  # one handler's bug must not stop the store's updates
            log.exception("store: a handler of %s failed", event.key)
