"""One watch over every key under the etcd prefix, in its own thread.

APISIX 3.x follows its whole prefix with one watch; so does gproxy.  The
routes, upstreams and ssls and the fleet's keys (instances, eviction jobs)
then arrive in etcd's revision order on one stream, so whoever reads them
on the hub sees a job only after every route change written before it.

``PrefixWatch`` resumes from the revision after the last event it saw when
the stream breaks (etcd restarted, connection lost, ``watch_timeout`` of
silence), reads ``reload_range`` again when that revision was compacted, and
retries with back-off while etcd is down.  It hands ``("events", [Event])``
and ``("reload", range answer)`` to ``deliver`` (called in the watch thread;
the store queues them for the hub).  ``stop()`` interrupts a blocked read.
"""

import logging
import threading
import time
from collections import namedtuple

from gproxy.errors import StoreUnavailable
from gproxy.protocols.text import printable
from gproxy.store.etcdclient import Compacted, WatchStream, prefix_end, unb64

log = logging.getLogger("gproxy.store")
RETRY_MAX = 5.0  # seconds between watch attempts while etcd is down
STOP_TIMEOUT = 5.0

#: One change: the key (text), whether it was deleted, its value (text, "" when
#: deleted), and its create and mod revisions.
Event = namedtuple("Event", "key deleted value created revision")


def text(b64text):
    return unb64(b64text).decode("utf-8", "replace")


class PrefixWatch:
    """Follows ``prefix`` from ``revision + 1`` until stopped."""

    def __init__(self, cluster, prefix, revision, watch_timeout, deliver, reload_range):
        self.cluster = cluster
        self.range = (prefix + "/", prefix_end(prefix + "/"))
        self.revision = revision
        self.watch_timeout = watch_timeout
        self.deliver = deliver
        self.reload_range = reload_range
        self._stop = threading.Event()
        self._stream = None
        self._thread = None

    def alive(self):
        return self._thread is not None and self._thread.is_alive()

    def start(self):
        if self._stop.is_set():
            return
        self._thread = threading.Thread(target=self._forever, name="gproxy-etcd-watch",
                                        daemon=True)
        self._thread.start()

    def stop(self, sleep):
        """Interrupt the stream and wait (with ``sleep``, cooperative) for the thread."""
        self._stop.set()
        stream = self._stream
        if stream is not None:
            stream.interrupt()
        deadline = time.monotonic() + STOP_TIMEOUT
        while self.alive() and time.monotonic() < deadline:
            sleep(0.02)

    def _forever(self):
        reload_first, delay, down = False, 0.5, None
        while not self._stop.is_set():
            try:
                if reload_first:
                    body = self.cluster.range(*self.reload_range)
                    self.revision = int(body["header"]["revision"])
                    self.deliver("reload", body)
                    reload_first = False
                down = self._once(down)
                delay = 0.5
            except Compacted as exc:
                log.warning("store: etcd compacted revision %s; reloading", exc)
                reload_first = True
            except (StoreUnavailable, OSError, ValueError) as exc:
                if down is None:
                    log.error("store: etcd watch failed: %s; serving the last known "
                              "routes and retrying", printable(str(exc)))
                down = down or time.monotonic()
                self._stop.wait(delay)
                delay = min(delay * 2, RETRY_MAX)
            except Exception:  # never let the watch die: log and retry
                log.exception("store: etcd watch failed")
                self._stop.wait(RETRY_MAX)

    def _once(self, down):
        """Open a watch after the last seen revision and follow it until it ends."""
        stream = WatchStream(self.cluster, *self.range, self.revision + 1, self.watch_timeout)
        self._stream = stream
        try:
            if self._stop.is_set():
                return down
            for result in stream.messages():
                if result.get("created") and down is not None:
                    log.warning("store: etcd watch resumed from revision %d after %.1fs",
                                self.revision + 1, time.monotonic() - down)
                    down = None
                if result.get("compact_revision") or result.get("canceled"):
                    raise Compacted(result.get("compact_revision"))
                events = [_event(e) for e in result.get("events") or ()]
                if events:
                    self.revision = max(e.revision for e in events)
                    self.deliver("events", events)
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


def _event(event):
    kv = event["kv"]
    deleted = event.get("type") == "DELETE"
    return Event(text(kv["key"]), deleted, "" if deleted else text(kv.get("value")),
                 int(kv.get("create_revision") or 0), int(kv["mod_revision"]))
