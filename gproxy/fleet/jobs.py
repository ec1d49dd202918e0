"""Fleet-wide evictions: a job kept in etcd, followed from any instance.

``start(spec, rate)`` writes ``<prefix>/gproxy/evictions/<id>`` (``id``: a
revision of ``<prefix>/gen_id``, as APISIX makes ids) with the selector, the
total rate, the instances registered now and its lease (``KEEP`` seconds,
renewed by every instance while its share runs, so a finished job stays
visible about an hour).  Each instance, this one included, takes its share
(``shares``); the answer comes once every named instance has counted its
sessions (at most ``shares.SETTLE`` s).  ``get(id)`` reads the job and its
shares from etcd, so any instance answers the same: the counts are the sums
of the shares.  A share whose instance has left the registry while running
(killed: its lease ran out) is ``lost`` and what it had left counts as
``failed``; a share ``stopped`` by its instance's shutdown counts what it
had left as ``gone`` (the shutdown ended them cleanly itself).  The job is
``done`` when no share is running.  ``cancel(id)`` marks the job cancelled;
every instance stops its share.
"""

import time

from gproxy.fleet.shares import PATH, SETTLE, split

KEEP = 3600  # seconds a job's record outlives its last renewal
SHARE_FIELDS = ("total", "done", "gone", "failed")


def aggregate(job, shares, alive, now=None):
    """The Admin API's eviction dict for a fleet job (pure).

    ``shares``: ``{instance: share}``; ``alive``: ids of registered instances.
    """
    now = now or time.time()
    sums = dict.fromkeys(SHARE_FIELDS, 0)
    items, running, finished = [], False, []
    for instance, share in sorted(shares.items()):
        state = share.get("state")
        counts = {f: int(share.get(f) or 0) for f in SHARE_FIELDS}
        left = counts["total"] - counts["done"] - counts["gone"] - counts["failed"]
        if state in ("counting", "running") and instance not in alive:
            state, counts["failed"] = "lost", counts["failed"] + left
        running |= state in ("counting", "running")
        if share.get("finished_at"):
            finished.append(share["finished_at"])
        for f in SHARE_FIELDS:
            sums[f] += counts[f]
        items.append(dict(counts, instance=instance, state=state, rate=share.get("rate")))
    waiting = [i for i in job.get("instances") or () if i not in shares and i in alive]
    counting = bool(waiting) and now - job.get("started_at", now) < SETTLE
    if job.get("state") == "cancelled":
        state = "cancelled"
    else:
        state = "running" if running or counting else "done"
    finished_at = max(finished, default=now) if state != "running" else None
    return {"id": job["id"], "state": state, "total": sums["total"], "done": sums["done"],
            "failed": sums["failed"], "gone": sums["gone"],
            "remaining": sums["total"] - sums["done"] - sums["gone"] - sums["failed"],
            "rate": job.get("rate"), "selector": job.get("selector") or {},
            "started_at": job.get("started_at"), "finished_at": finished_at,
            "elapsed": round((finished_at or now) - job.get("started_at", now), 3),
            "fleet": True, "started_by": job.get("started_by"), "instances": items}


class FleetJobs:
    """Starts, reads and cancels fleet jobs (the shares do the work)."""

    def __init__(self, kv, shares, registered):
        self.kv = kv
        self.shares = shares
        self.registered = registered  # () -> ids of the gproxy instances registered now

    def start(self, spec, rate):
        job_id = self.kv.new_id()
        lease = self.kv.grant(KEEP)
        job = {"id": job_id, "selector": spec, "rate": rate, "state": "running",
               "started_at": time.time(), "started_by": self.shares.id,
               "instances": sorted(self.registered()), "lease": lease}
        self.kv.put(PATH + job_id, job, lease)
        self.shares.wait_counts(job_id, job["instances"], paced=True)
        return self.get(job_id)

    def _jobs(self, path):
        """``{job id: (job, {instance: share})}`` for the keys under ``path``."""
        grouped = {}
        for key, value in self.kv.items(path).items():
            parsed = split(key)
            if parsed is None:
                continue
            entry = grouped.setdefault(parsed[0], [None, {}])
            if parsed[1] is None:
                entry[0] = value
            else:
                entry[1][parsed[1]] = value
        return {job_id: (job, shares) for job_id, (job, shares) in grouped.items() if job}

    def _read(self, job_id):
        """``(job, {instance: share})`` from etcd, or None."""
        if not job_id.isdigit():
            return None
        return self._jobs(PATH + job_id).get(job_id)

    def get(self, job_id):
        found = self._read(job_id)
        return None if found is None else aggregate(*found, set(self.registered()))

    def list(self):
        alive = set(self.registered())
        return [aggregate(job, shares, alive)
                for _, (job, shares) in sorted(self._jobs(PATH).items())]

    def cancel(self, job_id):
        found = self._read(job_id)
        if found is None:
            return None
        job = dict(found[0], state="cancelled")
        self.kv.put(PATH + job_id, job, job.get("lease"))
        return aggregate(job, found[1], set(self.registered()))
