"""The instance registry: each instance's record under APISIX's data-plane key.

APISIX's ``server-info`` plugin keeps ``<prefix>/data_plane/server_info/<id>``
with ``id``, ``hostname``, ``version``, ``boot_time`` and ``etcd_version`` on
an etcd lease of ``plugin_attr.server-info.report_ttl`` seconds (default 60),
renewed at half the TTL, so a node that dies disappears when its lease runs
out.  gproxy writes the same key and fields (``version`` is gproxy's), plus
its own under ``gproxy``: the Admin API address other instances use, its
pid, live sessions in all and per node, and whether it is draining (shutting
down).  ``Reporter`` renews the lease every third of the TTL (a missed
renewal is retried a second later, well before the lease runs out), rewrites
the record when it changed, grants a new lease when etcd lost the old one,
and revokes it when the instance stops, so a clean stop leaves at once.

The id is APISIX's: ``apisix.id`` if set, else ``apisix.uid`` next to the
config file (made once with a random UUID, as APISIX makes
``conf/apisix.uid``).

A live upgrade keeps the registration: the old process ``hand_over()``s its
lease (stops renewing, revokes nothing, never reports draining) and the new
one ``take_over(...)``s it (renews that lease and rewrites the record with
its pid, keeping ``boot_time``), so the key never goes and tools watching
the registry see the same instance with a new pid.
"""

import logging
import os
import socket
import time
import uuid

import gevent

from gproxy import __version__
from gproxy.errors import StoreUnavailable

log = logging.getLogger("gproxy.fleet")
PATH = "/data_plane/server_info/"
RETRY = 1.0  # seconds before a failed renewal is tried again


def instance_id(configured, directory):
    """``apisix.id``, else the id kept in ``<directory>/apisix.uid`` (made if missing)."""
    if configured:
        return str(configured)
    path = os.path.join(directory, "apisix.uid") if directory else None
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                found = fh.read().strip()
            if found:
                return found
        except OSError:
            pass
    made = str(uuid.uuid4())
    if path:
        try:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(made)
        except OSError as exc:
            log.warning("fleet: cannot keep the instance id in %s (%s); this run is %s",
                        path, exc.strerror, made)
    return made


def admin_url(cfg):
    """``gproxy.fleet.admin_url``, else the address the Admin API listens on."""
    if cfg["gproxy.fleet.admin_url"]:
        return cfg["gproxy.fleet.admin_url"].rstrip("/")
    host = cfg["deployment.admin.admin_listen.ip"]
    if host in ("0.0.0.0", "::"):
        host = socket.gethostname()  # every address: the name others know it by
    elif ":" in host:
        host = "[%s]" % host
    scheme = "https" if cfg["deployment.admin.https_admin"] else "http"
    return "%s://%s:%d" % (scheme, host, cfg["deployment.admin.admin_listen.port"])


def describe(path, record, now=None):
    """One registry record as the Admin API lists it (gproxy's fields flattened)."""
    own = record.get("gproxy") if isinstance(record.get("gproxy"), dict) else None
    item = {"id": record.get("id") or path[len(PATH):], "hostname": record.get("hostname"),
            "version": record.get("version"), "boot_time": record.get("boot_time"),
            "etcd_version": record.get("etcd_version"),
            "product": "gproxy" if own is not None else "apisix"}
    if own is not None:
        item.update(admin=own.get("admin"), pid=own.get("pid"),
                    draining=bool(own.get("draining")),
                    live_sessions=own.get("live_sessions", 0),
                    per_node=own.get("per_node") or {}, reported_at=own.get("reported_at"))
    return item


class Reporter:
    """Keeps this instance's record on etcd while it runs."""

    def __init__(self, kv, ident, admin, ttl, stats):
        self.kv = kv
        self.id = ident
        self.admin = admin
        self.ttl = ttl
        self.stats = stats  # () -> {"live_sessions", "per_node", ...}
        self.path = PATH + ident
        self.boot_time = int(time.time())
        self.hostname = socket.gethostname()
        self.etcd_version = "unknown"
        self.draining = False
        self.lease = None
        self._sent = None
        self._loop = None
        self._reporting = False  # a report is on its way to etcd

    def record(self):
        stats = self.stats()
        return {"id": self.id, "hostname": self.hostname, "version": __version__,
                "boot_time": self.boot_time, "etcd_version": self.etcd_version,
                "gproxy": {"admin": self.admin, "pid": os.getpid(),
                           "live_sessions": stats.get("live_sessions", 0),
                           "per_node": stats.get("per_node") or {},
                           "draining": self.draining, "report_ttl": self.ttl}}

    def start(self):
        self._loop = gevent.spawn(self._run)

    def _run(self):
        failing = False
        while True:
            try:
                self.report()
                if failing:
                    log.warning("fleet: registered again as %s", self.id)
                failing = False
                gevent.sleep(max(self.ttl / 3.0, RETRY))
            except (StoreUnavailable, OSError, ValueError, KeyError) as exc:
                if not failing:
                    log.error("fleet: cannot renew this instance's registration: %s; "
                              "retrying", exc)
                failing = True
                gevent.sleep(RETRY)

    def report(self, force=False):
        """Renew the lease (a new one if etcd lost it) and write the record if it changed."""
        self._reporting = True
        try:
            self._report(force)
        finally:
            self._reporting = False

    def _report(self, force):
        if self.etcd_version == "unknown":
            try:
                self.etcd_version = self.kv.etcd_version()
            except (StoreUnavailable, OSError, ValueError):
                pass  # registered without it; asked again at the next renewal
        if self.lease is not None and self.kv.keepalive(self.lease) <= 0:
            self.lease = None  # expired while etcd or this instance was away
        if self.lease is None:
            self.lease, self._sent = self.kv.grant(self.ttl), None
            log.warning("fleet: registered as %s (%s) with a %ds lease", self.id,
                        self.admin, self.ttl)
        record = self.record()
        if force or record != self._sent:
            self.kv.put(self.path, dict(record, gproxy=dict(record["gproxy"],
                                                            reported_at=time.time())),
                        self.lease)
            self._sent = record

    def set_draining(self):
        """Shutting down: say so at once (bounded: shutdown must not wait on etcd)."""
        if self.lease is None and self._sent is None:
            return  # not registered: a live upgrade's new process, or an old one after it
        self.draining = True
        with gevent.Timeout(2, False):
            try:
                self.report(force=True)
            except (StoreUnavailable, OSError, ValueError, KeyError) as exc:
                log.error("fleet: cannot report draining: %s", exc)

    # -- a live upgrade ----------------------------------------------------------
    def hand_over(self):
        """The old process, at the commit: stop renewing (a report on its way is
        let land first, so it cannot overwrite the new process's) and give the
        lease away; nothing is revoked.  ``{"lease", "boot_time"}``."""
        with gevent.Timeout(2, False):
            while self._reporting:
                gevent.sleep(0.01)
        if self._loop is not None:
            self._loop.kill(block=False)
            self._loop = None
        lease, self.lease, self._sent = self.lease, None, None
        return {"lease": lease, "boot_time": self.boot_time}

    def take_over(self, carried):
        """The new process, at the commit: the old one's lease and boot time; the
        first report renews it (or grants one if it ran out) and writes this pid."""
        self.lease, self.boot_time = carried.get("lease"), carried.get("boot_time",
                                                                       self.boot_time)
        self.start()

    def stop(self):
        """Leave the registry now: the lease (and so the record) is revoked."""
        if self._loop is not None:
            self._loop.kill(block=False)
        lease, self.lease = self.lease, None
        if lease is None:
            return
        with gevent.Timeout(2, False):
            try:
                self.kv.revoke(lease)
                log.warning("fleet: %s left the registry", self.id)
            except (StoreUnavailable, OSError) as exc:
                log.error("fleet: cannot leave the registry (%s); it expires within %ds",
                          exc, self.ttl)
