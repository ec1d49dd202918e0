"""Session greenlets, reused: one greenlet runs one session at a time, then the next.

Each accepted client is handled by one greenlet with blocking-style code, as
gevent's StreamServer does; but a greenlet that finishes a session parks
instead of dying, and the next client is handed to it.  Creating a greenlet
costs more than its session's preread on a fast client: the greenlet object,
its C stack bookkeeping and, on Python 3.11, a 16 KiB frame stack mapped and
unmapped (mmap/munmap, page faults) per greenlet.  At most ``idle_max``
greenlets wait parked; beyond that a finished one exits.

A parked greenlet holds about 6 KiB (its frame stack's touched pages, its
saved C stack, the object), so a burst of a few hundred clients setting up
at once would leave a megabyte or two parked for good.  Once a second the
greenlets that stayed parked the whole second, beyond ``keep``, exit (the
least recently used first): the pool follows what the load needs.

A job must leave nothing behind that could switch into its greenlet later
(gevent's own waits and ``Timeout`` clean up when they return or raise).
"""

import logging

from gevent import get_hub
from greenlet import GreenletExit, getcurrent, greenlet

log = logging.getLogger("gproxy.session")
TRIM_EVERY = 1.0  # seconds between two looks at the parked greenlets
KEEP = 16  # parked greenlets kept however quiet it is
TRIM_MAX = 16  # greenlets ended in one look at most (each a switch into it: ~50 us)


class SessionGreenlets:
    """``spawn(func, *args)`` for a StreamServer, on reused greenlets."""

    def __init__(self, idle_max=256, keep=KEEP, trim_every=TRIM_EVERY):
        self.hub = get_hub()
        self.idle_max = idle_max
        self.keep = keep
        self.idle = []  # parked, the least recently used first
        self.busy = set()
        self.low = 0  # fewest parked since the last look: the bottom ones were not needed
        self._trim = self.hub.loop.timer(trim_every, trim_every, ref=False)
        self._trim.start(self.trim)

    def spawn(self, func, *args):
        idle = self.idle
        if idle:
            worker = idle.pop()
            if len(idle) < self.low:
                self.low = len(idle)
        else:
            worker = greenlet(self._work, self.hub)
            self.low = 0
        self.busy.add(worker)
        self.hub.loop.run_callback(worker.switch, func, args)

    def _work(self, func, args):
        # (No local refers to this greenlet: a parked one that is dropped can then be
        # freed, its frame does not hold it.)
        while True:
            try:
                func(*args)
            except GreenletExit:
                self.busy.discard(getcurrent())
                return
            except Exception:  # one session's bug never takes the worker down
                log.exception("session failed")
            func = args = None
            self.busy.discard(getcurrent())
            if len(self.idle) >= self.idle_max:
                return
            self.idle.append(getcurrent())
            func, args = self.hub.switch()  # parked until spawn() hands over a job

    def trim(self):
        """End the greenlets that stayed parked since the last look (beyond ``keep``)."""
        spare = min(self.low, len(self.idle) - self.keep, TRIM_MAX)
        if spare > 0:
            unused, self.idle[:spare] = self.idle[:spare], []
            for worker in unused:
                worker.throw(GreenletExit)  # it leaves its park and ends
        self.low = len(self.idle)

    def __len__(self):
        return len(self.busy)

    def kill(self):
        """Stop every session greenlet, running or parked (GreenletExit)."""
        self._trim.stop()
        for worker in list(self.busy) + self.idle:
            self.hub.loop.run_callback(worker.throw, GreenletExit)
        self.busy.clear()
        self.idle.clear()
