"""``--workers``: live sessions move from a worker that holds far more than the others.

The kernel spreads new connections evenly over the workers' SO_REUSEPORT
listeners, but sessions live for days and end unevenly (a route's sessions
evicted, a node drained, one worker's clients all reconnecting elsewhere), so
one worker can end up relaying most of them on one core.  The parent checks
the workers' live counts every ``gproxy.workers.rebalance.interval`` seconds
(``plan``): when the busiest holds more than ``ratio`` times the average and
at least ``min_gap`` sessions more than the least busy, it moves sessions
from the busiest to the least busy, enough to bring the busiest to the
average, at most ``max_move`` a round, one move at a time.  The move is the
live upgrade's handover (``handover.Giver``/``Taker``, ``share`` mode:
sessions only; counters stay where they were counted), to a Unix socket each
worker listens on (``serve_imports``) in a private directory the parent
made.  TLS-terminated sessions cannot move and are never counted as movable
by the plan's caller: the plan only uses live counts, and a round that moves
nothing is simply logged.  docs/upgrade.md, "Rebalancing workers".
"""

import logging
import os

import gevent

from gproxy.runtime.handover import Giver, Taker
from gproxy.runtime.wire import HandoverError, Wire, connect, listen

log = logging.getLogger("gproxy.workers")


def plan(counts, ratio=1.5, min_gap=200, max_move=1000):
    """``(from index, to index, how many)`` for live ``counts`` per worker, or None."""
    if len(counts) < 2:
        return None
    average = sum(counts) / len(counts)
    busiest = max(range(len(counts)), key=counts.__getitem__)
    idlest = min(range(len(counts)), key=counts.__getitem__)
    gap = counts[busiest] - counts[idlest]
    if counts[busiest] <= ratio * average or gap < min_gap:
        return None
    share = min(int(counts[busiest] - average), gap // 2, max_move)
    return (busiest, idlest, share) if share > 0 else None


# -- in a worker -----------------------------------------------------------------------------
def serve_imports(app, path):
    """Accept sessions other workers give this one, at ``path``, for the worker's life."""
    server = listen(path, 4)

    def one(conn):
        taker = Taker(app, Wire(conn))
        try:
            taker.listeners()  # none: a move between workers hands sessions only
            moved = taker.take()
        except HandoverError as exc:
            log.error("rebalance: worker %s: %s", app.worker_index, exc)
            return
        log.warning("rebalance: worker %s took %d sessions", app.worker_index, moved)

    def run():
        while True:
            conn, _ = server.accept()
            one(conn)  # one move at a time
    return gevent.spawn(run)


def give_share(app, path, share):
    """Give up to ``share`` live sessions to the worker listening at ``path``."""
    giver = Giver(app, connect(path, "the worker"))
    giver.prepare(share=share)
    moved = giver.commit()
    return {"moved": moved, "paused": round(giver.pause, 4)}


# -- in the parent ----------------------------------------------------------------------------
class Rebalancer:
    """The parent's loop: look at the workers' counts, move sessions when one holds too many."""

    def __init__(self, workers, folder, interval=30.0, ratio=1.5, min_gap=200, max_move=1000):
        self.workers = workers
        self.folder = folder  # worker i listens at worker-<i>.sock there
        self.interval = interval
        self.options = {"ratio": ratio, "min_gap": min_gap, "max_move": max_move}
        self.greenlet = gevent.spawn(self._run) if interval else None

    def _run(self):
        while True:
            gevent.sleep(self.interval)
            try:
                self.round()
            except Exception:  # one bad round never stops the next
                log.exception("rebalance: round failed")

    def round(self):
        counts = self.workers.live_counts()
        if counts is None:
            return None  # a worker did not answer: not the time to move sessions
        step = plan(counts, **self.options)
        if step is None:
            return None
        source, target, share = step
        log.warning("rebalance: worker %d holds %d sessions, worker %d %d: moving %d",
                    source, counts[source], target, counts[target], share)
        target_index = self.workers.index[self.workers.channels[target].pid]
        path = os.path.join(self.folder, "worker-%d.sock" % target_index)
        reply = self.workers.give_share(source, path, share)
        if reply is not None:
            log.warning("rebalance: moved %d sessions from worker %d to worker %d, each "
                        "paused %.3fs at most", reply["moved"], source, target, reply["paused"])
        return reply

    def stop(self):
        if self.greenlet is not None:
            self.greenlet.kill(block=False)
