"""The HTTP connections gproxy closes on its own, told in one line a second.

An idle flood on the admin port closes thousands of connections a second
(reclaimed at the cap, idle or request timeouts, malformed requests, failed
TLS handshakes).  One line each would bury the log and cost the hub more
than the flood itself, so ``CloseTally`` counts them per listener and
reason and writes one summary line at most once a second; the last counts
go out a second after the first of them, so nothing is held back for long.
One tally serves every HTTP listener of a process.  ``totals`` keeps the
counts since start for the metrics.
"""

import logging
import time

log = logging.getLogger("gproxy.admin")

#: reasons that only mean a client went quiet: the summary is info, not warn.
_ROUTINE = frozenset(("idle",))


class CloseTally:
    """Counts of closed HTTP connections by (listener, reason); see the module."""

    def __init__(self, loop, logger=log, interval=1.0, clock=time.monotonic):
        self.loop = loop
        self.log = logger
        self.interval = interval
        self.clock = clock
        self.pending = {}
        self.clients = {}  # client address -> connections of it closed since the last line
        self.totals = {}
        self.since = None
        self.next_line = 0.0
        self._timer = None

    def note(self, listener, reason, client=""):
        key = (listener, reason)
        self.totals[key] = self.totals.get(key, 0) + 1
        self.pending[key] = self.pending.get(key, 0) + 1
        if reason not in _ROUTINE:
            self.clients[client] = self.clients.get(client, 0) + 1
        now = self.clock()
        if self.since is None:
            self.since = now
        if now >= self.next_line:
            self.flush()
        elif self._timer is None:
            self._timer = self.loop.timer(self.next_line - now)
            self._timer.start(self.flush)

    def flush(self):
        """Write the pending counts as one line (nothing if there are none)."""
        if self._timer is not None:
            self._timer.stop()
            self._timer = None
        if not self.pending:
            return
        now = self.clock()
        pending, self.pending = self.pending, {}
        clients, self.clients = self.clients, {}
        level = logging.INFO if {r for _, r in pending} <= _ROUTINE else logging.WARNING
        total = sum(pending.values())
        top = ""
        if clients:  # whom to look at (or block) when it is a flood
            client = max(clients, key=clients.get)
            top = "; most from %s (%d)" % (client or "(unix socket)", clients[client])
        self.log.log(level, "http: closed %d connection%s in %.1fs: %s%s", total,
                     "" if total == 1 else "s", max(now - self.since, 0.0),
                     _describe(pending), top)
        self.since = None
        self.next_line = now + self.interval


def _describe(counts):
    """``admin idle=3 reclaimed=700, metrics idle=1`` (reasons in alphabetical order)."""
    by_listener = {}
    for (listener, reason), n in sorted(counts.items(), key=lambda item: item[0][1]):
        by_listener.setdefault(listener, []).append("%s=%d" % (reason, n))
    return ", ".join("%s %s" % (name, " ".join(parts)) for name, parts in by_listener.items())
