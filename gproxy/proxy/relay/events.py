"""Relay callbacks run in the order the kernel reported their sockets ready.

libev runs the I/O callbacks of one loop iteration last-in first-out, the
reverse of the order epoll reported the sockets ready, so bytes two clients
sent 50 µs apart could reach the broker swapped (a PUBLISH overtaking another
client's SUBSCRIBE).  ``EventQueue`` restores the kernel's order for the
relay; nothing else on the hub depends on it.
"""

import collections
import itertools
import logging
from time import perf_counter

log = logging.getLogger("gproxy.relay")

#: libev's lowest watcher priority (EV_MINPRI): run after every I/O callback.
_LOWEST = -2

#: Records replayed in one loop iteration at most.  A burst (9,000 clients
#: closing at once) runs in slices of this many, still in order, and timers,
#: accepts and the Admin API get the hub between slices, as HAProxy's
#: ``tune.maxpollevents`` does.  A slice also stops after ``SLICE`` seconds
#: (looked at every 8 records): an end costs 20-60 µs, so 64 of them take
#: over 2 ms on a busy machine.
BATCH = 64
SLICE = 0.0015


def _nothing():
    pass


class EventQueue:
    """Relay callbacks, run in the order the kernel reported their sockets ready.

    A watcher's callback is the queue's ``append`` with a *record* as its one
    argument: it records and returns.  A record is whatever waits on the
    socket (a relay's ``Direction``): the queue calls its ``ready()``, and
    ``park()``/``unpark()``/``fail()`` below.  Nothing is allocated per event
    and per watcher only its one-element argument tuple, which matters at
    tens of thousands of idle sessions.  A check watcher at the lowest priority runs after
    all I/O callbacks of a loop iteration and replays the records: libev
    queued them last-in first-out, so they are replayed backwards (libuv
    dispatches in order, so there they are replayed forwards).  Records added
    while replaying (a TLS endpoint with bytes still buffered) run after.

    More than ``BATCH`` records: ``BATCH`` run and the rest wait in ``later``,
    to run first in the next iterations, ahead of what those report.  A
    waiting record is parked: ``record.park()`` stops its watcher, which is
    level-triggered and would otherwise report the same socket again every
    iteration (9,000 re-reports an iteration, tripling the CPU a burst
    costs); once it has run, ``record.unpark()`` starts the watcher again if
    it is still wanted.  An idle watcher keeps the loop from blocking while
    records wait.  A record whose ``ready()`` raises gets ``fail()``.
    """

    def __init__(self, loop):
        self.ready = []
        self.append = self.ready.append
        self.later = collections.deque()  # parked records, in order
        self.reverse = type(loop).__module__.startswith("gevent.libev")
        self._check = loop.check(ref=False)
        self._check.priority = _LOWEST
        self._check.start(self._run)
        self._idle = loop.idle(ref=False)

    def _run(self):
        ready = self.ready
        if not ready:
            return
        n = len(ready)
        if n > BATCH:
            return self._run_slice()
        try:
            for record in (reversed(ready) if self.reverse else ready[:n]):
                try:
                    record.ready()
                except Exception:  # never raise into the hub; the others still run
                    self._failed(record)
            i = n
            while i < len(ready):  # added while replaying: after the batch, in order
                record = ready[i]
                i += 1
                try:
                    record.ready()
                except Exception:
                    self._failed(record)
        finally:
            del ready[:]

    def _run_slice(self):
        """Run the parked records, then the new ones, ``BATCH`` in all; park the rest."""
        ready, later = self.ready, self.later
        parked = len(later)
        later.extend(reversed(ready) if self.reverse else ready)
        del ready[:]
        i = 0
        deadline = perf_counter() + SLICE
        try:
            while later and i < BATCH and (i & 7 or perf_counter() < deadline):
                record = later.popleft()
                i += 1
                try:
                    record.ready()
                    if i <= parked:
                        record.unpark()
                except Exception:
                    self._failed(record)
        finally:
            later.extend(ready)  # records added while running go after
            del ready[:]
            for record in itertools.islice(reversed(later), len(later) - max(parked - i, 0)):
                record.park()
            if later:  # the check runs slices until none is left, and the loop may not block
                self._check.callback = self._run_slice
                self._idle.start(_nothing)
            else:
                self._check.callback = self._run
                self._idle.stop()

    @staticmethod
    def _failed(record):
        log.exception("relay: callback failed")
        try:
            record.fail()
        except Exception:
            log.exception("relay: ending a failed relay failed")

    def close(self):
        self._check.stop()
        self._check.close()
        self._idle.stop()
        self._idle.close()
