"""Session greenlets, reused: one greenlet runs one session at a time, then the next.

Each accepted client is handled by one greenlet with blocking-style code, as
gevent's StreamServer does; but a greenlet that finishes a session parks
instead of dying, and the next client is handed to it.  Creating a greenlet
costs more than its session's preread on a fast client: the greenlet object,
its C stack bookkeeping and, on Python 3.11, a 16 KiB frame stack mapped and
unmapped (mmap/munmap, page faults) per greenlet.  At most ``idle_max``
greenlets wait parked; beyond that a finished one exits.

A job must leave nothing behind that could switch into its greenlet later
(gevent's own waits and ``Timeout`` clean up when they return or raise).
"""

import logging

from gevent import get_hub
from greenlet import GreenletExit, getcurrent, greenlet

log = logging.getLogger("gproxy.session")


class SessionGreenlets:
    """``spawn(func, *args)`` for a StreamServer, on reused greenlets."""

    def __init__(self, idle_max=256):
        self.hub = get_hub()
        self.idle_max = idle_max
        self.idle = []
        self.busy = set()

    def spawn(self, func, *args):
        worker = self.idle.pop() if self.idle else greenlet(self._work, self.hub)
        self.busy.add(worker)
        self.hub.loop.run_callback(worker.switch, func, args)

    def _work(self, func, args):
        me = getcurrent()
        while True:
            try:
                func(*args)
            except GreenletExit:
                self.busy.discard(me)
                return
            except Exception:  # one session's bug never takes the worker down
                log.exception("session failed")
            func = args = None
            self.busy.discard(me)
            if len(self.idle) >= self.idle_max:
                return
            self.idle.append(me)
            func, args = self.hub.switch()  # parked until spawn() hands over a job

    def __len__(self):
        return len(self.busy)

    def kill(self):
        """Stop every running session greenlet (GreenletExit) and drop the parked ones."""
        for worker in list(self.busy):
            self.hub.loop.run_callback(worker.throw, GreenletExit)
        self.busy.clear()
        self.idle.clear()
