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

A live upgrade moves the jobs with the sessions: ``hold()`` pauses every
job between two batches while the sessions are handed over (``release()``
if the handover fails), ``export()`` writes them out at the commit, and in
the new process ``adopt()`` lists them under the same ids and runs the
unfinished ones on from the session where they stopped, at the same rate.
"""

import itertools
import logging
import time

import gevent
from gevent.event import Event

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

    @property
    def processed(self):
        """How many of ``ids`` were asked to end (they go in order)."""
        return self.done + self.failed + self.gone

    #: What a live upgrade hands over of a job (``export`` / ``restored``).
    STATE = ("id", "ids", "rate", "selector", "done", "failed", "gone", "state",
             "started_at", "finished_at")

    def export(self):
        return {name: getattr(self, name) for name in self.STATE}

    @classmethod
    def restored(cls, state):
        job = cls(state["id"], list(state["ids"]), state["rate"], state["selector"])
        for name in cls.STATE[4:]:
            setattr(job, name, state[name])
        return job

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
        self._next = itertools.count(1)
        self._go = Event()  # cleared while a live upgrade holds every job
        self._go.set()
        self._batches = 0  # batches being ended right now

    def start(self, spec, rate=None):
        """Start ending what ``spec`` matches now; returns the job (running)."""
        job = Eviction(str(next(self._next)), self.select(spec), rate,
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

    # -- a live upgrade ---------------------------------------------------------
    def hold(self, timeout=5.0):
        """Pause every job before its next batch; returns once none is mid-batch."""
        self._go.clear()
        with gevent.Timeout(timeout, False):
            while self._batches:
                gevent.sleep(0.005)

    def release(self):
        self._go.set()

    def hand_over(self):
        """At the commit, held: every job (finished ones too, for GET) for the next
        process; the running ones end here as ``moved``."""
        state = {"next": next(self._next), "jobs": [job.export() for job in self.jobs.values()]}
        for job in self.jobs.values():
            if job.state == "running":
                job.state = "moved"
        self.release()
        return state

    def adopt(self, state, run=True):
        """A previous process's jobs: listed under their ids, the running ones run
        on (``run``) from where they stopped; ids handed out from here go on after."""
        self._next = itertools.count(max(state["next"], next(self._next)))
        for item in state["jobs"]:
            job = Eviction.restored(item)
            self.jobs[job.id] = job
            if job.state == "running" and run:
                gevent.spawn(self._run, job)
        return [job for job in self.jobs.values() if job.state == "running"]

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
        """End ``job.ids`` in order: the k-th at ``start + k / rate`` (no drift),
        from the first not asked yet (a job a previous process began)."""
        total, sent = len(job.ids), job.processed
        start = time.monotonic() - (sent / job.rate if job.rate else 0.0)
        while sent < total and job.state == "running":
            if not self._go.is_set():  # a live upgrade: the job may go on in the next process
                held = time.monotonic()
                self._go.wait()
                start += time.monotonic() - held  # the pause is not a backlog to catch up
                if job.state != "running":
                    break
            if job.rate is None:
                due = min(total, sent + BATCH)
            else:
                due = min(total, sent + BATCH,
                          int((time.monotonic() - start) * job.rate) + 1)
            if due > sent:
                batch = job.ids[sent:due]
                sent = due
                self._batches += 1
                try:
                    result = self.end_many(batch)
                finally:
                    self._batches -= 1
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
