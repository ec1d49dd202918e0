"""Live upgrade: SIGUSR2 starts the gproxy now on disk and hands it everything.

The old process runs the new one with the same command (the CLI's
``command()``: the venv's python with the same arguments, or the one-file
executable; or ``gproxy.upgrade.command``) and one
end of a Unix socketpair, named in ``$GPROXY_UPGRADE_FD``.  Over it
(``handover.Wire``):

    new -> old   {"op": "hello", "format": 1, "pid", "version"}   config and store loaded
    old          refuses another format: {"op": "abort"}, and keeps everything
    then, one process:   the handover of ``handover.Giver``/``Taker`` on this
                         wire, the HTTP listeners (Admin API, control, metrics)
                         travelling with the stream listeners, and what the
                         process holds besides sessions after the commit
                         (``carry``: store, fleet registration, jobs)
    with --workers N:    old -> new {"op": "listeners", "http": [...], "early"} + fds
                         new -> old {"op": "workers", "paths": [...]}: its N
                         workers wait there; old worker i gives to new worker i
                         over that path, all of them up to "prepared", then
                         all commit; old -> new {"op": "commit"}, new -> old
                         {"op": "committed"}, old -> new {"op": "carried", ...}

``give``/``take_over`` are the two sides whoever started the new process: an
embedded proxy's host program uses them over a Unix socket path
(``transfer``), its process mode over a path the handle chose
(``proxy.upgrade()``).  The new process is a ``Gproxy(standby=True)``: it
relays the sessions it adopts and accepts clients, but its store, Admin API
and fleet registration wait for the commit.  It tells systemd it is the main
process (``sdnotify``) before it answers the commit, and the old one then
drains what could not move (TLS sessions: DISCONNECT at a packet boundary,
as at SIGTERM) and exits.  If the new process cannot start, cannot read its
config, speaks another format, times out or dies before the commit, the old
one logs why, takes back every session and listener and stops the new one.
A second USR2 while a handover runs is refused with a log line.
docs/upgrade.md is the user's guide.
"""

import logging
import os
import shutil
import socket
import sys
import tempfile
import time

import gevent
import gevent.socket
import gevent.subprocess

from gproxy import __version__
from gproxy.runtime import carry, sdnotify
from gproxy.runtime.handover import FORMAT, Giver, HandoverError, Taker
from gproxy.runtime.wire import STEP_TIMEOUT, Wire

log = logging.getLogger("gproxy.upgrade")

ENV = "GPROXY_UPGRADE_FD"


def http_listeners(app):
    """``(addr text, socket)`` of the Admin API, control API and metrics listeners."""
    from gproxy.proxy.accept.listener import addr_text
    out = []
    for server in [app.admin_server] + list(app.http_servers):
        sock = getattr(server, "socket", None)
        if sock is not None:
            out.append((addr_text(*sock.getsockname()[:2]), sock))
    return out


class Upgrader:
    """The old process's side: one handover at a time."""

    def __init__(self, app, command):
        self.app = app
        self.command = command  # how this process was started (the CLI knows)
        self.busy = False

    def request(self):
        """USR2: start a handover in a greenlet (None, logged, if one runs already)."""
        if self.busy:
            log.warning("upgrade: refused: a handover is already in progress")
            return None
        self.busy = True
        return gevent.spawn(self._run)

    def _run(self):
        started = time.monotonic()
        argv = self.app.cfg["gproxy.upgrade.command"] or self.command
        sdnotify.reloading()
        log.warning("upgrade: starting %s", " ".join(argv))
        proc = None
        try:
            proc, wire = self._spawn(argv)
            moved = give(self.app, wire, self.app.cfg["gproxy.upgrade.timeout"], proc)
        except (HandoverError, OSError) as exc:
            log.error("upgrade: %s; this process keeps every session and listener", exc)
            self._dismiss(proc)
            sdnotify.notify("READY=1", "STATUS=live upgrade failed: %s" % exc)
            self.busy = False
            return False
        log.warning("upgrade: handed %d sessions to pid %d in %.3fs", moved, proc.pid,
                    time.monotonic() - started)
        return True

    def _spawn(self, argv):
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        os.set_blocking(theirs.fileno(), True)  # a plain descriptor for the new program
        env = dict(os.environ, **{ENV: str(theirs.fileno())})
        if getattr(sys, "frozen", False):
            # A one-file executable started from inside another would otherwise take
            # the old one's unpacked bundle (gone once the old process exits) for its own.
            env["PYINSTALLER_RESET_ENVIRONMENT"] = "1"
        try:
            proc = gevent.subprocess.Popen(argv, env=env, pass_fds=(theirs.fileno(),),
                                           stdin=subprocess_devnull())
        except OSError as exc:
            mine.close()
            raise OSError(exc.errno, "cannot start the new process: %s" % exc.strerror)
        finally:
            theirs.close()
        return proc, Wire(gevent.socket.socket(fileno=mine.detach()))

    @staticmethod
    def _dismiss(proc):
        """Stop a new process that will not take over (it drains what it accepted)."""
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
        gevent.spawn(proc.wait)  # reaped in the background: no zombie


# -- the old side, whoever started the new one ------------------------------------------
def give(app, wire, timeout, proc=None):
    """Everything to the gproxy at the other end of ``wire``, once it said hello
    (within ``timeout`` s, in this format); how many sessions moved.  HandoverError
    (everything still here) if it fails before the commit."""
    try:
        hello, _ = wire.recv(timeout, expect="hello")
    except HandoverError as exc:
        wire.close()
        raise HandoverError("the new process did not start the handover: %s%s"
                            % (exc, _exit_note(proc))) from None
    if hello.get("format") != FORMAT:
        wire.send({"op": "abort"})
        wire.close()
        raise HandoverError("the new process (gproxy %s) reads handover format %s, this "
                            "one writes %s" % (hello.get("version"), hello.get("format"),
                                               FORMAT))
    http = http_listeners(app)
    if app.workers is not None:
        return _give_workers(app, wire, http)
    giver = Giver(app, wire, http, top=True)
    giver.prepare()
    moved = giver.commit()
    log.warning("upgrade: %s", giver.summary())
    return moved


def _give_workers(app, wire, http):
    """With --workers: old worker i gives to new worker i; the parents carry the rest."""
    workers = app.workers
    wire.send({"op": "listeners", "stream": [], "http": [text for text, _ in http],
               "early": carry.early(app)}, [sock.fileno() for _, sock in http])
    message, _ = wire.recv(expect="workers")
    carry.hold(app)
    try:
        workers.hand_over(message["paths"])
    except HandoverError:
        carry.release(app)
        wire.send({"op": "abort"})
        wire.close()
        raise
    moved = workers.commit_handover()
    wire.send({"op": "commit", "carries": True})
    try:
        wire.recv(expect="committed")
        carry.send(app, wire)
    except HandoverError as exc:
        log.error("upgrade: no answer to the commit (%s)", exc)
    wire.close()
    return moved


def subprocess_devnull():
    return gevent.subprocess.DEVNULL


def _exit_note(proc):
    if proc is None:
        return ""  # not ours (an embedded proxy's successor)
    try:
        code = proc.wait(timeout=2)
    except gevent.subprocess.TimeoutExpired:
        return ""
    return " (it exited with code %s)" % code


# -- the new process ----------------------------------------------------------------------
def inherited_wire():
    """The wire to the old process when this one was started by a live upgrade, else None."""
    fd = os.environ.pop(ENV, None)
    if fd is None:
        return None
    return Wire(gevent.socket.socket(fileno=int(fd)))


def take_over(app, wire, workers=1, notify=True):
    """Say hello, serve the handed listeners and adopt every session; returns how
    many moved (None with workers: each logs its own count).  ``app`` is a
    ``Gproxy(standby=True)``; ``notify``: tell systemd this is the main process
    now (the ``gproxy`` command; never an embedded proxy).

    HandoverError if the old process called it off or went away: the caller
    stops this process (the old one kept everything)."""
    wire.send({"op": "hello", "format": FORMAT, "pid": os.getpid(), "version": __version__})
    on_commit = sdnotify.new_main if notify else None
    taker = Taker(app, wire, on_commit)
    app.inherited = taker.listeners()
    carry.seed(app, taker.early)
    if workers <= 1:
        app.start(workers=1)
        return taker.take()
    folder = tempfile.mkdtemp(prefix="gproxy-upgrade-")
    try:
        paths = [os.path.join(folder, "worker-%d.sock" % i) for i in range(workers)]
        app.start(workers=workers, handover=paths)
        wire.send({"op": "workers", "paths": paths})
        wire.recv(STEP_TIMEOUT * 2, expect="commit")
        if on_commit is not None:
            on_commit()
        wire.send({"op": "committed"})
        carry.receive(app, wire)
        wire.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return None  # each worker logs what it took
