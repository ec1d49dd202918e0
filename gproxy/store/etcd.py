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
last valid value), as APISIX's config_etcd does.
"""

import collections
import json
import logging
import threading
import time
from dataclasses import dataclass

import gevent

from gproxy.errors import SchemaError, StoreUnavailable
from gproxy.model import jsontext
from gproxy.model.ssls import without_secrets
from gproxy import hub
from gproxy.store.base import KINDS, Record, Store, check_item, diff
from gproxy.store.etcdclient import Cluster, Compacted, WatchStream, blocking, unb64

log = logging.getLogger("gproxy.store")
RETRY_MAX = 5.0  # seconds between watch attempts while etcd is down
STOP_TIMEOUT = 5.0


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
                 health_check_timeout=10, pause=hub.pause):
        super().__init__()
        self._pause = pause
        self.prefix = prefix.rstrip("/")
        self.cluster = Cluster(hosts, timeout, health_check_timeout)
        self.watch_timeout = watch_timeout
        # ssls < stream_routes < upstreams: one range (and one watch) covers the
        # three kinds; other APISIX keys inside it (system_config) are skipped
        self.range = (self.prefix + "/ssls/", self.prefix + "/upstreams0")
        self._tombs = {}  # (kind, id) -> revision of a delete applied here
        self._inbox = collections.deque()  # watch thread -> hub
        self._draining = False
        self._stop = threading.Event()
        self._thread = self._stream = self._wake = None
        body = blocking(self.cluster.range, *self.range)  # raises if etcd is down
        self._apply_reload(body)
        self._watch_revision = int(body["header"]["revision"])

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
            log.error("invalid item data of [%s/%s/%s], val: %s, it should be an object",
                      self.prefix, kind, id_, "(not shown)" if kind == "ssls" else raw[:200])
            return None
        value["id"] = id_  # APISIX: the key names the object
        try:
            check_item(kind, value, self._pause)
        except SchemaError as exc:
            shown = without_secrets(value)  # no private keys, whatever the kind (as the file codec)
            log.error("failed to check item data of [%s/%s] err:%s ,val: %s",
                      self.prefix, kind, exc, json.dumps(shown)[:500])
            return None
        return value

    # -- the interface -------------------------------------------------------
    def put(self, kind, id_, value):
        id_ = str(id_)
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        body = blocking(self.cluster.put, self._key(kind, id_), text)
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
        if self._thread is None or not self._thread.is_alive():
            if not self._stop.is_set():
                self._start_watch()
        return False

    def close(self):
        self._stop.set()
        stream = self._stream
        if stream is not None:
            stream.interrupt()
        deadline = time.monotonic() + STOP_TIMEOUT
        while self._thread is not None and self._thread.is_alive() \
                and time.monotonic() < deadline:
            gevent.sleep(0.02)
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

    def _apply_events(self, events):
        """Apply watch events in order (pausing between them); returns the changes."""
        changes = []
        for kind, id_, deleted, raw, created, revision in events:
            self._pause()
            if deleted:
                current = self._data[kind].get(id_)
                if current is not None and current.modified_index < revision:
                    del self._data[kind][id_]
                    self._tombs[(kind, id_)] = revision
                    changes.append((kind, id_, None))
                continue
            value = self._decode(kind, id_, raw)
            record = None if value is None else EtcdRecord(kind, id_, value, created,
                                                           revision, self.prefix)
            if record is not None and self._set(record):
                changes.append((kind, id_, record))
        return changes

    def _apply_reload(self, body):
        """Replace the copy with a full range read (keeping newer local writes)."""
        revision = int(body["header"]["revision"])
        fresh = {kind: {} for kind in KINDS}
        for kv in body.get("kvs") or ():
            self._pause()
            parsed = self._split(_text(kv["key"]))
            if parsed is None:
                continue
            kind, id_ = parsed
            value = self._decode(kind, id_, _text(kv.get("value")))
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
                        changes += self._apply_events(payload)
                if changes:
                    self._notify(changes)
        finally:
            self._draining = False

    # -- the watch (its own thread; a greenlet in a monkey-patched process) ----
    def _start_watch(self):
        if self._wake is None:
            self._wake = gevent.get_hub().loop.async_()
            # a greenlet, not the callback itself: subscribers may wait (workers' acks)
            self._wake.start(lambda: gevent.spawn(self._drain))
        self._thread = threading.Thread(target=self._watch_forever, name="gproxy-etcd-watch",
                                        daemon=True)
        self._thread.start()

    def _deliver(self, op, payload):
        self._inbox.append((op, payload))
        wake = self._wake
        if wake is not None:
            wake.send()

    def _watch_forever(self):
        reload_first, delay, down = False, 0.5, None
        while not self._stop.is_set():
            try:
                if reload_first:
                    body = self.cluster.range(*self.range)
                    self._watch_revision = int(body["header"]["revision"])
                    self._deliver("reload", body)
                    reload_first = False
                down = self._watch_once(down)
                delay = 0.5
            except Compacted as exc:
                log.warning("store: etcd compacted revision %s; reloading", exc)
                reload_first = True
            except (StoreUnavailable, OSError, ValueError) as exc:
                if down is None:
                    log.error("store: etcd watch failed: %s; serving the last known "
                              "routes and retrying", exc)
                down = down or time.monotonic()
                self._stop.wait(delay)
                delay = min(delay * 2, RETRY_MAX)
            except Exception:  # never let the watch die: log and retry
                log.exception("store: etcd watch failed")
                self._stop.wait(RETRY_MAX)

    def _watch_once(self, down):
        """Open a watch after the last seen revision and follow it until it ends."""
        stream = WatchStream(self.cluster, *self.range, self._watch_revision + 1,
                             self.watch_timeout)
        self._stream = stream
        try:
            if self._stop.is_set():
                return down
            for result in stream.messages():
                if result.get("created") and down is not None:
                    log.warning("store: etcd watch resumed from revision %d after %.1fs",
                                self._watch_revision + 1, time.monotonic() - down)
                    down = None
                if result.get("compact_revision") or result.get("canceled"):
                    raise Compacted(result.get("compact_revision"))
                events = [self._event(e) for e in result.get("events") or ()]
                events = [e for e in events if e is not None]
                if result.get("events"):
                    self._watch_revision = max(int(e["kv"]["mod_revision"])
                                               for e in result["events"])
                if events:
                    self._deliver("events", events)
        except Exception as exc:
            if self._stop.is_set():
                return down
            if "Read timed out" in str(exc):  # an idle watch: reopen from the revision
                return down
            raise
        finally:
            self._stream = None
            stream.close()
        return down

    def _event(self, event):
        kv = event["kv"]
        parsed = self._split(_text(kv["key"]))
        if parsed is None:
            return None
        deleted = event.get("type") == "DELETE"
        return (parsed[0], parsed[1], deleted, "" if deleted else _text(kv.get("value")),
                int(kv.get("create_revision") or 0), int(kv["mod_revision"]))


def _text(b64text):
    return unb64(b64text).decode("utf-8", "replace")
