"""This instance's part of fleet-wide evictions: its share of each job.

Every instance follows ``<prefix>/gproxy/evictions/`` through the store's
watch, so a job arrives after every route change written before it (a
rebalance then sees the new ring).  For a new running job an instance picks
the sessions the job's selector matches here, now, and writes its share
(``.../<job>/shares/<instance>``, on the job's lease) with that ``total``;
it waits (at most ``SETTLE`` seconds) until every instance the job named has
written one, then ends its sessions at ``rate × mine / all`` (at once when
the job has no rate), so the fleet's total is the job's rate and every
instance finishes at about the same time.  Progress is written every
``PROGRESS_EVERY`` seconds and at the end, and the job's lease is renewed
while a share runs, so a job lives while any instance works on it, whoever
started it.  A job set to ``cancelled`` stops the shares; ``stop()`` (this
instance shutting down) ends each running share as ``stopped``: the
shutdown's own drain ends those sessions cleanly.

A live upgrade hands the running shares to the new process with the
sessions (``hand_over`` / ``take_over``): the same instance id, the same
share key, the same pace, from the session where the old process stopped.
The new process takes no share of its own before (``standby``).  A share
still counting at the commit cannot move: the old process writes it
``done`` with its sessions ``failed`` (they were not ended; run the job
again).
"""

import logging
import time

import gevent

from gproxy.errors import StoreUnavailable
from gproxy.proxy.sessions.evict import Eviction

log = logging.getLogger("gproxy.fleet")
PATH = "/gproxy/evictions/"
SETTLE = 2.0          # seconds to wait for every named instance's count
PROGRESS_EVERY = 1.0  # seconds between progress writes of a running share
RENEW_EVERY = 60.0    # seconds between renewals of a running job's lease
WRITE_ERRORS = (StoreUnavailable, OSError, ValueError)


def split(path):
    """``(job id, instance or None)`` for a job or share path, else None."""
    parts = path[len(PATH):].split("/")
    if len(parts) == 1 and parts[0]:
        return parts[0], None
    if len(parts) == 3 and parts[1] == "shares":
        return parts[0], parts[2]
    return None


def share_path(job_id, instance):
    return "%s%s/shares/%s" % (PATH, job_id, instance)


class Shares:
    """Follows the fleet's jobs and runs this instance's shares."""

    def __init__(self, kv, ident, sessions):
        self.kv = kv
        self.id = ident
        self.sessions = sessions  # () -> the sessions view (LiveSessions or WorkerSet)
        self.jobs = {}  # job id -> {"job": value, "shares": {instance: value}}
        self.running = {}  # job id -> (Eviction, its progress greenlet): this instance's shares
        self.stopping = False
        self.standby = False  # a live upgrade's new process, until the commit
        self.handed = False  # a live upgrade's old process, after the commit

    # -- the watch (on the hub; quick) -------------------------------------------
    def on_change(self, path, value, revision):
        found = split(path)
        if found is None:
            return
        job_id, instance = found
        if value is None and job_id not in self.jobs:
            return  # the job's keys expiring together: it is forgotten already
        seen = self.jobs.setdefault(job_id, {"job": None, "shares": {}})
        if instance is not None:
            if value is None:
                seen["shares"].pop(instance, None)
            else:
                seen["shares"][instance] = value
            return
        if value is None:  # the job's lease ran out: forget it
            self.jobs.pop(job_id, None)
            return
        first = seen["job"] is None
        seen["job"] = value
        if value.get("state") == "cancelled" and job_id in self.running:
            self.running[job_id][0].state = "cancelled"
        elif first and value.get("state") == "running" and not (self.stopping or self.standby):
            gevent.spawn(self._take, job_id, value)

    def wait_counts(self, job_id, expected, paced=False, timeout=SETTLE):
        """The shares known for ``job_id`` once ``expected`` instances all wrote one
        (``paced``: and set its rate), or ``timeout`` passed."""
        deadline = time.monotonic() + timeout
        while True:
            shares = self.jobs.get(job_id, {}).get("shares", {})
            ready = set(expected) <= set(shares) and not (paced and any(
                s.get("state") == "counting" for s in shares.values()))
            if ready or time.monotonic() >= deadline:
                return dict(shares)
            gevent.sleep(0.02)

    # -- one share ---------------------------------------------------------------
    def _take(self, job_id, job):
        try:
            ids = self.sessions().select(job.get("selector") or {})
        except ValueError as exc:  # the starter checked it; a newer selector we do not know
            log.error("fleet eviction %s: cannot select sessions here: %s", job_id, exc)
            ids = []
        share = Eviction(job_id, ids, None, job.get("selector") or {})
        lease = job.get("lease")
        if not self._write(share, lease, "counting" if ids else "done"):
            return
        if not ids:
            return
        shares = self.wait_counts(job_id, job.get("instances") or ())
        everyone = sum(int(s.get("total") or 0) for s in shares.values()) or len(ids)
        if job.get("rate"):
            share.rate = job["rate"] * len(ids) / max(everyone, len(ids))
        if self.handed:  # its sessions moved to a new process while this one counted
            log.error("fleet eviction %s: this share's %d sessions moved to a new process "
                      "(live upgrade) before it began: counted as failed", job_id, len(ids))
            share.failed = len(ids)
            self._write(share, lease, "done")
            return
        self._run_share(job_id, share, lease)

    def _run_share(self, job_id, share, lease):
        progress = gevent.spawn(self._report, share, lease)
        self.running[job_id] = (share, progress)
        try:
            if (self.jobs.get(job_id, {}).get("job") or {}).get("state") == "cancelled":
                share.state = "cancelled"
            self.sessions().evictions.run(share)
        finally:
            progress.kill()
            self.running.pop(job_id, None)
            if share.state not in ("stopped", "moved"):  # a moved one is the new process's
                self._write(share, lease, share.state)

    def _report(self, share, lease):
        renewed, written = time.monotonic(), None
        while True:
            progress = (share.done, share.gone, share.failed)
            if progress != written and self._write(share, lease, "running"):
                written = progress
            if lease and time.monotonic() - renewed >= RENEW_EVERY:
                try:
                    self.kv.keepalive(lease)
                    renewed = time.monotonic()
                except WRITE_ERRORS as exc:
                    log.error("fleet eviction %s: cannot renew its lease: %s", share.id, exc)
            gevent.sleep(PROGRESS_EVERY)

    def _write(self, share, lease, state, extra_gone=0):
        value = {"instance": self.id, "total": len(share.ids), "done": share.done,
                 "gone": share.gone + extra_gone, "failed": share.failed, "rate": share.rate,
                 "state": state, "started_at": share.started_at,
                 "finished_at": share.finished_at or (
                     time.time() if state not in ("counting", "running") else None)}
        try:
            self.kv.put(share_path(share.id, self.id), value, lease)
            return True
        except WRITE_ERRORS as exc:
            log.error("fleet eviction %s: cannot write this instance's progress: %s",
                      share.id, exc)
            return False

    # -- a live upgrade -------------------------------------------------------------
    def hand_over(self):
        """At the commit (the jobs held): the running shares, for the new process;
        here they end as ``moved`` and nothing more is written."""
        self.handed = self.stopping = True
        out = []
        for job_id, (share, progress) in list(self.running.items()):
            progress.kill()
            out.append({"job": (self.jobs.get(job_id) or {}).get("job"),
                        "share": share.export()})
            share.state = "moved"
        return out

    def take_over(self, items):
        """The old process's running shares, run on here from where they stopped."""
        self.standby = False
        for item in items:
            job, share = item["job"] or {}, Eviction.restored(item["share"])
            self.jobs.setdefault(share.id, {"job": None, "shares": {}})["job"] = job
            gevent.spawn(self._resume, share, job.get("lease"))

    def _resume(self, share, lease):
        log.warning("fleet eviction %s: this instance's share goes on here (live upgrade): "
                    "%d of %d left", share.id, share.remaining, len(share.ids))
        self._run_share(share.id, share, lease)

    def stop(self):
        """Shutting down: no new shares; running ones end as ``stopped`` (bounded)."""
        self.stopping = True
        if self.handed:
            return  # they went on in the new process
        with gevent.Timeout(2, False):
            for job_id, (share, progress) in list(self.running.items()):
                share.state = "stopped"
                progress.kill()
                lease = (self.jobs.get(job_id, {}).get("job") or {}).get("lease")
                self._write(share, lease, "stopped", extra_gone=share.remaining)
