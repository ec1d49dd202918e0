"""Handovers over a Unix socket path, between processes that did not start each other.

* ``--workers`` live upgrade: old worker *i* ``give``s to new worker *i*,
  which ``take_at`` its path (the new parent made the path; the old parent
  tells its worker where), up to the commit the parents decide together.
* An embedded gproxy (``runtime.embed``): the host's old process
  ``give_all`` to the host's new one, which waits in ``take_over_at``; the
  process mode's ``upgrade()`` does the same between its old and new child.
  Both are the command's live upgrade (``upgrade.give``/``take_over``) on a
  path instead of an inherited socketpair.

(The CLI's own upgrade uses the socketpair it hands its child:
``runtime.upgrade``; rebalancing between workers: ``runtime.rebalance``.)
"""

import logging
import os

import gevent

from gproxy.runtime.handover import Giver, HandoverError, Taker
from gproxy.runtime.wire import STEP_TIMEOUT, Wire, connect, listen

log = logging.getLogger("gproxy.upgrade")


# -- --workers: old worker i gives to new worker i over a Unix socket path ----------------
def give(app, path):
    """In an old worker: hand everything to the new worker waiting at ``path``,
    up to the commit (``app.giver.commit()`` or ``.abort()`` follows)."""
    app.giver = Giver(app, connect(path, "the new worker"))
    try:
        return {"prepared": app.giver.prepare()}
    except HandoverError:
        app.giver = None
        raise


def commit(app):
    """In an old worker: the parent says every worker is prepared; commit ours."""
    giver, app.giver = app.giver, None
    if giver is None:
        return {"moved": 0}
    moved = giver.commit()
    log.warning("upgrade: worker %s handed %d sessions; %s", app.worker_index, moved,
                giver.summary())
    return {"moved": moved}


def take_at(app, path, timeout=STEP_TIMEOUT * 2):
    """In a new worker: wait at ``path`` for the old worker, serve its listeners,
    adopt its sessions (in a greenlet: the worker answers its parent meanwhile).
    If the old worker never comes or fails, bind our own listeners instead."""
    server = listen(path)

    def run():
        try:
            with gevent.Timeout(timeout, HandoverError("no old worker came")):
                conn, _ = server.accept()
            taker = Taker(app, Wire(conn))
            app.inherited = taker.listeners()
            app.start_listening()
            moved = taker.take()
            log.warning("upgrade: worker %s took over %d sessions", app.worker_index, moved)
        except HandoverError as exc:
            log.error("upgrade: worker %s: %s", app.worker_index, exc)
            if not app.listeners:
                app.start_listening()
        finally:
            server.close()
    gevent.spawn(run)


# -- an embedded gproxy: the host program's old process gives, its new one takes --------
def give_all(app, path, timeout=None):
    """Everything (listeners, HTTP listeners, sessions, store, fleet registration,
    jobs) to the gproxy waiting at ``path`` (``take_over_at``), as a live upgrade of
    the command does; how many sessions moved."""
    from gproxy.runtime.upgrade import give
    if timeout is None:
        timeout = app.cfg["gproxy.upgrade.timeout"]
    return give(app, connect(path, "the gproxy that takes over"), timeout)


def take_over_at(app, path, timeout, workers=1):
    """Wait at ``path`` for ``give_all``, start on its listeners, take its sessions
    (``app``: a ``Gproxy(standby=True)``); how many moved."""
    from gproxy.runtime.upgrade import take_over
    server = listen(path)
    try:
        with gevent.Timeout(timeout, HandoverError("nothing was handed over at %s within "
                                                   "%.0fs" % (path, timeout))):
            conn, _ = server.accept()
    finally:
        server.close()
        os.unlink(path)
    try:
        return take_over(app, Wire(conn), workers, notify=False)
    except HandoverError:
        app.stop(0)
        raise
