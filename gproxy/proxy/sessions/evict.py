"""Evictions: end many sessions cleanly, at a rate, with progress to follow.

An operator moves clients on purpose (drain a broker, rebalance a ring)
without a reconnect storm: ``Evictions.start(spec, rate)`` picks the live
sessions a query ``spec`` matches *now*, answers at once with a job, and a
greenlet ends them at ``rate`` per second (all at once, in batches that
yield between them, when ``rate`` is None), like EMQX's ``conn-evict-rate``.
Each end is clean (``Session.end``: a DISCONNECT to the broker so no Will is
published, 0x9C Use another server to an MQTT 5 client).

It works through two callables so one process and a parent of workers share
it: ``select(spec)`` gives the ids, ``end_many(ids)`` ends them and says how
many it ``ended`` and how many could not be asked (``failed``, a worker that
did not answer); the rest had ended by themselves (``gone``).
"""

import itertools
import logging
import time

import gevent

log = logging.getLogger("gproxy.evict")

BATCH = 256        # sessions ended between two yields when there is no rate
MIN_TICK = 0.01    # seconds between two batches at high rates
HISTORY = 50       # finished jobs kept for GET


class Eviction:
    """One job: which sessions, how fast, how far it got."""

    def __init__(self, job_id, ids, rate, selector):
        self.id = job_id
        self.ids = ids
        self.rate = rate
        self.selector = selector
        self.done = self.failed = self.gone = 0
        self.state = "running"
        self.started_at = time.time()
        self.finished_at = None

    @property
    def remaining(self):
        return len(self.ids) - self.done - self.failed - self.gone

    def as_dict(self):
        end = self.finished_at or time.time()
        return {"id": self.id, "state": self.state, "total": len(self.ids),
                "done": self.done, "failed": self.failed, "gone": self.gone,
                "remaining": self.remaining, "rate": self.rate, "selector": self.selector,
                "started_at": self.started_at, "finished_at": self.finished_at,
                "elapsed": round(end - self.started_at, 3)}


def _announce(job):
    log.warning("eviction %s: ending %d sessions at %s (%s)", job.id, len(job.ids),
                "%g/s" % job.rate if job.rate else "once", job.selector)


class Evictions:
    """The jobs of one process (the parent's, with workers)."""

    def __init__(self, select, end_many):
        self.select = select
        self.end_many = end_many
        self.jobs = {}
        self._ids = (str(n) for n in itertools.count(1))

    def start(self, spec, rate=None):
        """Start ending what ``spec`` matches now; returns the job (running)."""
        job = Eviction(next(self._ids), self.select(spec), rate,
                       {k: v for k, v in spec.items() if k not in ("ids", "limit", "offset")})
        self.jobs[job.id] = job
        self._forget_old()
        gevent.spawn(self._run, job)
        _announce(job)
        return job

    def run(self, job):
        """Pace a job built elsewhere (a fleet job's share) in the calling greenlet."""
        _announce(job)
        self._run(job)

    def get(self, job_id):
        return self.jobs.get(job_id)

    def cancel(self, job_id):
        job = self.jobs.get(job_id)
        if job is not None and job.state == "running":
            job.state = "cancelled"
        return job

    def _forget_old(self):
        finished = [j for j in self.jobs.values() if j.state != "running"]
        for job in finished[:max(0, len(finished) - HISTORY)]:
            del self.jobs[job.id]

    def _run(self, job):
        try:
            self._pace(job)
        except Exception:  # a failing job must not take the process down
            log.exception("eviction %s failed", job.id)
            job.failed += job.remaining
        if job.state == "running":
            job.state = "done"
        job.finished_at = time.time()
        log.warning("eviction %s %s: %d ended, %d had ended already, %d failed in %.1fs",
                    job.id, job.state, job.done, job.gone, job.failed,
                    job.finished_at - job.started_at)

    def _pace(self, job):
        """End ``job.ids`` in order: the k-th at ``start + k / rate`` (no drift)."""
        total, sent = len(job.ids), 0
        start = time.monotonic()
        while sent < total and job.state == "running":
            if job.rate is None:
                due = min(total, sent + BATCH)
            else:
                due = min(total, sent + BATCH,
                          int((time.monotonic() - start) * job.rate) + 1)
            if due > sent:
                batch = job.ids[sent:due]
                sent = due
                result = self.end_many(batch)
                job.done += result["ended"]
                job.failed += result.get("failed", 0)
                job.gone += len(batch) - result["ended"] - result.get("failed", 0)
            if sent >= total:
                break
            if job.rate is None:
                gevent.sleep(0)
            else:
                wait = start + sent / job.rate - time.monotonic()
                gevent.sleep(max(wait, MIN_TICK))
