"""Overload: the cap on open sessions, and running out of file descriptors.

``Gate`` counts the sessions a process has open (from accept to the last
byte relayed) against ``gproxy.max_connections``.  At the cap it stops every
listener's accept watcher, so new clients wait in the kernel's backlog (as
nginx's ``worker_connections`` makes them), and starts them again as soon as
a session ends.  When ``accept`` or a dial fails for want of descriptors
(EMFILE, ENFILE, ENOBUFS, ENOMEM) the gate pauses accepting for half a
second, as nginx does (``accept_mutex_delay``), instead of retrying at once:
no spin and no traceback, one log line a second at most (``Throttled``), and
accepting resumes by itself.  Nothing here reads config or touches a session.
"""

import errno
import logging
import time

import gevent

#: errno values that mean "this process (or host) is out of descriptors or buffers".
FD_ERRNOS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
#: nginx waits this long before accepting again after EMFILE (accept_mutex_delay).
FD_PAUSE = 0.5


def out_of_fds(exc):
    return isinstance(exc, OSError) and exc.errno in FD_ERRNOS


class Throttled:
    """A log line written at most once per ``interval``, with a count of the held back."""

    def __init__(self, logger, level, interval=1.0):
        self.logger = logger
        self.level = level
        self.interval = interval
        self.held = 0
        self.next = 0.0

    def __call__(self, msg, *args):
        now = time.monotonic()
        if now < self.next:
            self.held += 1
            return
        if self.held:
            msg += " (and %d more since the last such line)" % self.held
        self.held = 0
        self.next = now + self.interval
        self.logger.log(self.level, msg, *args)


class Gate:
    """Open sessions of one process against the cap; pauses and resumes accepting.

    Listeners register their servers (``servers``); ``reject(reason)`` counts
    a client turned away (the runtime points it at the registry).
    """

    def __init__(self, limit=None, reject=None, logger=None):
        self.limit = limit
        self.open = 0
        self.servers = []
        self.reject = reject or (lambda reason: None)
        self.paused = False
        self.log = logger or logging.getLogger("gproxy.listener")
        self.fd_log = Throttled(self.log, logging.CRITICAL)
        self._timer = None

    def full(self):
        return self.limit is not None and self.open >= self.limit

    def enter(self):
        self.open += 1

    def leave(self):
        self.open -= 1
        if self.paused and self._timer is None and not self.full():
            self.resume()

    def set_limit(self, limit):
        self.limit = limit
        if self.paused and self._timer is None and not self.full():
            self.resume()

    def pause(self, seconds=None):
        """Stop accepting everywhere; for ``seconds``, or until a session ends."""
        self.paused = True
        for server in self.servers:
            server.stop_accepting()
        if seconds and self._timer is None:
            self._timer = gevent.get_hub().loop.timer(seconds)
            self._timer.start(self._pause_over)

    def _pause_over(self):
        self._timer.close()
        self._timer = None
        self.resume()

    def resume(self):
        if self.full():
            return  # a session ending will resume
        self.paused = False
        for server in self.servers:
            if not server.closed:
                server.start_accepting()

    def out_of_fds(self, exc, what, count=True):
        """accept() or socket() failed for want of descriptors: log, count, pause."""
        if count:
            self.reject("fd_limit")
        self.fd_log("%s failed (%d: %s)", what, exc.errno, exc.strerror)
        self.pause(FD_PAUSE)

    def close(self):
        if self._timer is not None:
            self._timer.stop()
            self._timer.close()
            self._timer = None
        self.servers = []
