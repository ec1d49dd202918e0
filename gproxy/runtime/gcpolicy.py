"""Garbage collection in gproxy's own processes: keep live sessions out of the collector.

A full (generation 2) collection walks every object the cyclic collector
tracks, on the hub, in one go.  Live sessions are long-lived: a dozen tracked
objects each (session, record, relay, directions, watchers...), so at 9,000
sessions one full pass held the hub 50-80 ms, and it grows with every session.

Sessions hold no reference cycles (``tests/integration/test_gc.py``): each
session's objects are freed by their reference counts when it ends, not by
the collector.  So every ``INTERVAL`` this process collects what is not
frozen yet (start-up's objects the first time, then what survived since the
last round) and freezes the survivors (``gc.freeze``): the collector never
looks at them again, automatic passes walk only what is young, and a frozen
object that dies is still freed at once by its count.  What a round costs is
what the last quarter second left alive (a burst of new sessions), not how
many sessions there are.

A frozen object that ends up in a reference cycle is never freed by a round.
``scripts/gc_soak.py`` (every kind of session, evictions, the Admin API, for
minutes) found nothing of the kind; still, should some future code leak that
way, the process would grow beyond what its live sessions explain.  Each
round compares its resident memory with that: once RSS exceeds what it was
at the last mark by ``ALLOWANCE`` plus ``PER_SESSION`` for each session above
the count then (the most seen since, as freed memory stays in the heap), it
*audits*: unfreezes everything, collects once (a full pass: tens of
milliseconds at 10,000 sessions, logged with what it found) and freezes
again.  So such a leak is bounded; without one no audit runs.  (RSS, read
from /proc, costs microseconds; ``gc.get_freeze_count()`` walks every frozen
object, 7 ms at 2,000 sessions.)

Only the CLI and its workers do this, never a program that embeds gproxy
(the collector is that program's).
"""

import gc
import logging
import os
import time

import gevent

log = logging.getLogger("gproxy")
INTERVAL = 0.25  # seconds between rounds
PER_SESSION = 64 * 1024  # bytes of RSS one live session may account for (TLS: ~16 KiB)
ALLOWANCE = 256 * 1024 * 1024  # RSS growth beyond that before an audit


def freeze_survivors():
    """Collect what is not frozen yet, then freeze what is left of it."""
    gc.collect()
    gc.freeze()


def resident_bytes():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * _PAGE


_PAGE = os.sysconf("SC_PAGE_SIZE")


class Policy:
    """The rounds of one process; ``live()`` counts its sessions (0 if not given)."""

    def __init__(self, live=None, rss=resident_bytes, per_session=PER_SESSION,
                 allowance=ALLOWANCE):
        self.live = live or (lambda: 0)
        self.rss = rss
        self.per_session = per_session
        self.allowance = allowance
        self.audits = 0
        self.found = 0  # unreachable objects the last audit collected
        self._mark()

    def _mark(self):
        self.rss_then = self.rss()
        self.live_then = self.peak = self.live()

    def round(self):
        freeze_survivors()
        self.peak = max(self.peak, self.live())
        explained = self.per_session * (self.peak - self.live_then)
        if self.rss() - self.rss_then > self.allowance + explained:
            self.audit()

    def audit(self):
        """Unfreeze, collect everything once, freeze again; log what it found."""
        started = time.perf_counter()
        gc.unfreeze()
        self.found = gc.collect()
        gc.freeze()
        self.audits += 1
        log.warning("garbage collection audit: the process outgrew its live sessions; "
                    "a full pass found %d unreachable objects in %.1f ms", self.found,
                    (time.perf_counter() - started) * 1000)
        self._mark()


def start(interval=INTERVAL, live=None):
    """Freeze what start-up built, then freeze survivors every ``interval`` s."""
    freeze_survivors()
    policy = Policy(live)
    gevent.spawn(_rounds, policy, interval)
    return policy


def _rounds(policy, interval):
    while True:
        gevent.sleep(interval)
        policy.round()
