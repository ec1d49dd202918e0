"""Relay callbacks run in the order the kernel reported their sockets ready.

libev runs the I/O callbacks of one loop iteration last-in first-out, the
reverse of the order epoll reported the sockets ready, so bytes two clients
sent 50 µs apart could reach the broker swapped (a PUBLISH overtaking another
client's SUBSCRIBE).  ``EventQueue`` restores the kernel's order for the
relay; nothing else on the hub depends on it.
"""

import logging

log = logging.getLogger("gproxy.relay")

#: libev's lowest watcher priority (EV_MINPRI): run after every I/O callback.
_LOWEST = -2


class EventQueue:
    """Relay callbacks, run in the order the kernel reported their sockets ready.

    A watcher's callback is the queue's ``append`` with ``(function, arg)``: it
    records and returns.  A check watcher at the lowest priority runs after
    all I/O callbacks of a loop iteration and replays the records: libev
    queued them last-in first-out, so they are replayed backwards (libuv
    dispatches in order, so there they are replayed forwards).  Records added
    while replaying (a TLS endpoint with bytes still buffered) run after.
    """

    def __init__(self, loop):
        self.ready = []
        self.append = self.ready.append
        self.reverse = type(loop).__module__.startswith("gevent.libev")
        self._check = loop.check(ref=False)
        self._check.priority = _LOWEST
        self._check.start(self._run)

    def _run(self):
        ready = self.ready
        if not ready:
            return
        n = len(ready)
        func = None
        try:
            for func, arg in (reversed(ready) if self.reverse else ready[:n]):
                func(arg)
            i = n
            while i < len(ready):  # added while replaying: after the batch, in order
                func, arg = ready[i]
                i += 1
                func(arg)
        except Exception:  # never raise into the hub
            log.exception("relay: callback failed")
            relay = getattr(func, "__self__", None)
            if relay is not None:
                relay.abort("error: internal")
            # The rest of the batch is dropped: its watchers are level-triggered
            # and report the same sockets again on the next iteration.
        finally:
            del ready[:]

    def close(self):
        self._check.stop()
        self._check.close()
