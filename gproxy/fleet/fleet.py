"""What the Admin API asks of the fleet: ``Fleet`` on etcd, ``SoloFleet`` without.

``Fleet`` lists the registered instances with their live sessions (asked
fresh of each instance, the record's last report for one that does not
answer), answers a session query for the whole fleet (each instance's first
``offset + limit`` matches, this one's asked directly, merged into one page;
each item names its ``instance``), and starts, reads and cancels fleet-wide
evictions.  ``SoloFleet`` gives the same answers for this instance alone,
with a ``note`` saying why (the file store, or ``gproxy.fleet.enable``
off): a fleet request never fails for want of a fleet.

The sessions view (``LiveSessions`` or the workers' ``WorkerSet``) is a
callable, as the runtime only knows it once started.
"""

import logging
from collections import Counter

import gevent

from gproxy.errors import StoreUnavailable
from gproxy.fleet.instances import PATH as REGISTRY, Reporter, admin_url, describe, \
    instance_id
from gproxy.fleet.jobs import FleetJobs
from gproxy.fleet.kv import FleetKV
from gproxy.fleet.peers import Peers
from gproxy.fleet.shares import PATH as JOBS, Shares
from gproxy.proxy.sessions.live import check_spec, merge_pages

log = logging.getLogger("gproxy.fleet")
SESSIONS = "/apisix/admin/gproxy/sessions"
STATS = "/apisix/admin/gproxy/stats"
MAX_PAGE = 500  # APISIX's largest page_size


def _totals(items):
    per_node = Counter()
    for item in items:
        per_node.update(item.get("per_node") or {})
    return dict(per_node)


class SoloFleet:
    """This instance alone, answered like a fleet of one (with a note)."""

    enabled = False

    def __init__(self, sessions, note):
        self.sessions = sessions
        self.note = note

    def start(self):
        pass

    def stop(self):
        pass

    def leave(self):
        pass

    def standby(self):
        pass

    def hand_over(self):
        return None

    def take_over(self, carried):
        pass

    def instances(self, token):
        stats = self.sessions().stats()
        me = {"id": None, "product": "gproxy", "self": True, "reachable": True,
              "live_sessions": stats.get("live_sessions", 0),
              "per_node": stats.get("per_node") or {}}
        return {"list": [me], "total": 1, "per_node": me["per_node"], "unreachable": [],
                "note": self.note}

    def query(self, spec, token):
        return dict(self.sessions().query(spec), note=self.note)

    def evict(self, spec, rate):
        return dict(self.sessions().evictions.start(spec, rate).as_dict(), note=self.note)

    def eviction(self, job_id):
        return None

    def evictions(self):
        return []

    def cancel(self, job_id):
        return None


class Fleet(SoloFleet):
    """The instances registered on this etcd, this one included."""

    enabled = True

    def __init__(self, store, cfg, sessions):
        super().__init__(sessions, None)
        self.kv = FleetKV(store)
        self.id = instance_id(cfg["apisix.id"], cfg.base_dir if cfg.path else None)
        self.admin = admin_url(cfg)
        self.ttl = cfg["plugin_attr.server-info.report_ttl"]
        self.reporter = Reporter(self.kv, self.id, self.admin, self.ttl,
                                 lambda: self.sessions().stats())
        self.shares = Shares(self.kv, self.id, sessions)
        self.jobs = FleetJobs(self.kv, self.shares, self.registered)
        mtls = "deployment.admin.admin_api_mtls."
        self.peers = Peers(cfg["gproxy.fleet.timeout"], cfg.admin_file(mtls + "admin_ssl_ca_cert"),
                           cfg.admin_file(mtls + "admin_ssl_cert"),
                           cfg.admin_file(mtls + "admin_ssl_cert_key"))
        self._records = None  # {path: record} of the registry, kept by the watch
        self.kv.watch(REGISTRY, self._on_record)
        self.kv.watch(JOBS, self.shares.on_change)

    def start(self):
        self.reporter.start()

    def _on_record(self, path, record, revision):
        if self._records is None:
            return  # not read yet: the first read has it
        if record is None:
            self._records.pop(path, None)
        else:
            self._records[path] = record

    def stop(self):
        """Shutting down: report draining, end this instance's shares (bounded)."""
        self.reporter.set_draining()
        self.shares.stop()

    # -- a live upgrade: the same instance, in a new process ---------------------------
    def standby(self):
        """The new process until the commit: not registered, taking no share."""
        self.shares.standby = True

    def hand_over(self):
        """The old process, at the commit: the registration and the running shares."""
        carried = dict(self.reporter.hand_over(), id=self.id, shares=self.shares.hand_over())
        return carried

    def take_over(self, carried):
        """The new process, at the commit: go on as the same instance (or, if the
        id changed with the config, let the old one's registration go)."""
        if carried is None or carried.get("id") != self.id:
            self._let_go(carried)
            self.reporter.start()
            self.shares.standby = False
            return
        self.reporter.take_over(carried)
        self.shares.take_over(carried.get("shares") or ())

    def _let_go(self, carried):
        lease = (carried or {}).get("lease")
        if lease:
            log.warning("fleet: the old process was instance %s; this one is %s",
                        carried.get("id"), self.id)
            gevent.spawn(self._revoke, lease)

    def _revoke(self, lease):
        try:
            self.kv.revoke(lease)
        except (StoreUnavailable, OSError) as exc:
            log.error("fleet: cannot revoke the old registration (%s); it expires", exc)

    def leave(self):
        self.reporter.stop()
        self.peers.close()

    # -- the registry ----------------------------------------------------------
    def registry(self):
        """Every registered instance (gproxy's and APISIX's), as ``describe`` lists them.

        Read from etcd once, then kept by the store's watch: asking costs no
        request, and an etcd outage leaves the last known fleet (whose
        instances still answer their Admin APIs) rather than none."""
        if self._records is None:
            self._records = self.kv.items(REGISTRY)
        items = [describe(path, rec) for path, rec in self._records.items()]
        return sorted(items, key=lambda item: str(item["id"]))

    def registered(self):
        return [i["id"] for i in self.registry() if i["product"] == "gproxy"]

    def _others(self, items):
        return [i for i in items if i["product"] == "gproxy" and i["id"] != self.id
                and i.get("admin")]

    def instances(self, token):
        try:
            items = self.registry()
        except StoreUnavailable as exc:
            return dict(super().instances(token), note="the registry could not be read "
                        "(%s): this instance only" % exc)
        answers, missing = self.peers.ask(self._others(items), lambda peer: self.peers.get_json(
            peer["admin"], STATS, {}, token))
        fresh = {peer["id"]: stats for peer, stats in answers}
        fresh[self.id] = self.sessions().stats()
        if self.id not in [i["id"] for i in items]:
            items.append({"id": self.id, "product": "gproxy", "admin": self.admin,
                          "registered": False})
        for item in items:
            item["self"] = item["id"] == self.id
            if item["id"] in fresh:
                stats = fresh[item["id"]]
                item.update(reachable=True, live_sessions=stats.get("live_sessions", 0),
                            per_node=stats.get("per_node") or {})
            elif item["product"] == "gproxy":
                item["reachable"] = False  # its last report stands
        return {"list": items, "total": len(items), "self": self.id, "report_ttl": self.ttl,
                "per_node": _totals(i for i in items if i["product"] == "gproxy"),
                "unreachable": missing}

    # -- sessions ---------------------------------------------------------------
    def query(self, spec, token):
        """One page over every instance's sessions; each item names its ``instance``."""
        check_spec(spec)
        need = spec.get("offset", 0) + spec.get("limit", MAX_PAGE)
        try:
            peers = self._others(self.registry())
        except StoreUnavailable as exc:
            return dict(super().query(spec, token), note="the registry could not be read "
                        "(%s): this instance only" % exc)
        local = gevent.spawn(self.sessions().query, dict(spec, offset=0, limit=need))
        answers, missing = self.peers.ask(peers, lambda peer: self._first(peer, spec, need,
                                                                          token))
        mine = local.get()  # asked while the others were
        replies = [(self.id, mine)] + [(peer["id"], page) for peer, page in answers]
        for instance, reply in replies:
            for item in reply["list"]:
                item["instance"] = instance
        out = merge_pages([reply for _, reply in replies], spec)
        out.update(fleet=True, unreachable=missing,
                   instances=[{"id": i, "total": r["total"]} for i, r in replies])
        return out

    def _first(self, peer, spec, need, token):
        """A peer's first ``need`` matches, in pages of at most 500."""
        params = {k: v for k, v in spec.items() if k not in ("offset", "limit", "ids")}
        if spec.get("misplaced"):
            params["misplaced"] = "true"
        if spec.get("ids") is not None:
            params["ids"] = ",".join(spec["ids"])
        size = min(MAX_PAGE, max(10, need))
        items, page = [], 1
        while True:
            body = self.peers.get_json(peer["admin"], SESSIONS,
                                       dict(params, page=page, page_size=size), token)
            items += body.get("list") or []
            if len(items) >= min(need, body.get("total", 0)) or not body.get("list"):
                return {"total": body.get("total", 0), "list": items[:need],
                        "per_node": body.get("per_node")}
            page += 1

    # -- evictions ----------------------------------------------------------------
    def evict(self, spec, rate):
        check_spec(spec)
        return self.jobs.start(spec, rate)

    def eviction(self, job_id):
        return self.jobs.get(job_id)

    def evictions(self):
        return self.jobs.list()

    def cancel(self, job_id):
        return self.jobs.cancel(job_id)
