"""``--workers N``: N forked proxy processes behind SO_REUSEPORT listeners.

The parent keeps the store, the Admin API and the dashboard; each worker
binds the stream listeners itself with SO_REUSEPORT (the kernel spreads new
connections across them) and runs the data path.  They talk over one Unix
socketpair per worker (``channel``: JSON lines with request ids):

    parent -> worker  {"op": "changes", "changes": [[kind, id, value], ...]}  -> {"ok": true}
                      {"op": "resync", "changes": [...], "first", "last"}  (the whole table)
                      {"op": "sessions"} / {"op": "stats"} / {"op": "close", "sid": ...}
                      {"op": "query", "spec": {...}} / {"op": "select", "spec": {...}}
                      {"op": "end_many", "sids": [...], "code", "grace", "server_reference"}
                      {"op": "health"} / {"op": "reload", "raw": {...}, "path": ...}
                      {"op": "reopen"}   (SIGUSR1: reopen the access log)
                      {"op": "handover", "path": ...}  (live upgrade: give to the new
                      worker waiting there, up to the commit) / {"op": "handover_commit"}
                      / {"op": "handover_abort"}
                      {"op": "rebalance_give", "path", "share"}  (give sessions to a worker)
                      {"op": "stop", "timeout": grace}   (drain, then exit)
                      {"op": "stop", "timeout": 0}       (during a drain: force)

A store write sends what changed to every worker (``merged``) and waits for
each ack before the Admin API answers, so "in effect when the response is
sent" holds across processes; a worker that cannot apply it is sent the
whole table, and the Admin API says so if that fails too.  A worker whose
parent dies sees EOF, drains and exits; a malformed message is logged and
dropped, never fatal; a worker that fails says why in the log before it
exits.  A worker keeps reading its channel while it drains, so the parent
can still force it.
"""

import logging
import os
import signal
import socket
import sys
import tempfile

import gevent
import gevent.socket

from gproxy.hub import pause as sessions_pause
from gproxy.runtime import gcpolicy
from gproxy.runtime.channel import (ACK_TIMEOUT, Channel, LineReader, decode, encode,
                                    encode_large)
from gproxy.runtime.transfer import commit, give
from gproxy.runtime.merged import WorkerSet
from gproxy.runtime.rebalance import give_share, serve_imports

log = logging.getLogger("gproxy.workers")


def _handlers(app):
    registry = lambda: app.registry  # noqa: E731 (the worker's own, set at start)
    sessions = lambda: app.sessions  # noqa: E731 (queries yield to the data path as they go)
    return {
        "query": lambda m: sessions().query(m["spec"]),
        "select": lambda m: {"ids": sessions().select(m["spec"])},
        "end_many": lambda m: sessions().end_many(m["sids"], m["code"], m["grace"],
                                                  m.get("server_reference")),
        "changes": lambda m: (app.tables.apply(m["changes"]), {"ok": True})[1],
        "resync": lambda m: (app.tables.take(m["changes"], m["first"], m["last"]),
                             {"ok": True})[1],
        "sessions": lambda m: {"list": registry().snapshot()},
        "stats": lambda m: registry().stats(),
        "close": lambda m: {"closed": registry().close(m["sid"])},
        "health": lambda m: {"list": app.health.report()},
        "reload": lambda m: (_reload(app, m), {"ok": True})[1],
        "reopen": lambda m: (app.reopen_logs(), {"ok": True})[1],
        "handover": lambda m: give(app, m["path"]),
        "handover_commit": lambda m: commit(app),
        "handover_abort": lambda m: (app.giver and app.giver.abort(), {"ok": True})[1],
        "rebalance_give": lambda m: give_share(app, m["path"], m["share"]),
    }


def _reload(app, message):
    from gproxy.config import Config
    app.reload_config(Config(message["raw"], message.get("path")), message.get("log_level"))


def serve_control(app, sock, reader=None):
    """Worker side: answer the parent until it says stop (returns the grace period)."""
    handlers = _handlers(app)
    reader = reader or LineReader(sock)
    while True:
        line = reader.readline()
        if not line:
            log.warning("worker %d: parent went away; stopping", os.getpid())
            return 0.0
        message = decode(line)
        if message is None:
            continue
        op, request_id = message.get("op"), message.get("id")
        if op == "stop":
            sock.sendall(encode({"id": request_id, "ok": True}))
            return float(message.get("timeout", 10.0))
        handler = handlers.get(op)
        if handler is None:
            log.error("worker %d: dropped a control message with unknown op %r",
                      os.getpid(), op)
            reply = {"error": "unknown op"}
        else:
            try:
                reply = handler(message)
            except Exception as exc:  # a bad request must not kill the worker
                log.exception("worker: %s failed", op)
                reply = {"error": str(exc)}
        sock.sendall(encode_large(dict(reply, id=request_id), sessions_pause))


def _run_worker(app, index, child_end, handover=None, imports=None):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent coordinates shutdown
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the parent reloads and tells us
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # likewise for reopening logs
    code = 0
    ctl = gevent.socket.socket(fileno=child_end.detach())
    try:
        try:
            if handover is None:
                app.start_worker(index)
            else:  # a live upgrade: take the old worker's listeners and sessions
                app.start_worker(index, handover)
            if imports is not None:
                serve_imports(app, imports)  # sessions other workers give this one
        except Exception as exc:  # the parent's start-up error names the reason
            ctl.sendall(encode({"error": str(exc) or type(exc).__name__}))
            raise
        ctl.sendall(encode({"ready": True}))
        # a worker is the CLI's: its sessions stay out of the collector
        gcpolicy.start(live=lambda: len(app.registry))
        reader = LineReader(ctl)
        drain = gevent.spawn(app.stop, serve_control(app, ctl, reader))
        gevent.spawn(_force_on_request, app, ctl, reader, drain)
        drain.join()
        if not drain.successful():
            log.error("worker %d (pid %d): stopping failed", index, os.getpid(),
                      exc_info=drain.exc_info)
            code = 1
    except BaseException:  # whatever it was, the log says it before the worker goes
        log.exception("worker %d (pid %d) failed; exiting", index, os.getpid())
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _force_on_request(app, sock, reader, drain):
    """While draining: a second stop from the parent forces (closes what is left)."""
    while not drain.ready():
        try:
            line = reader.readline()
        except OSError:
            return
        if not line:
            return  # the parent went away: the drain goes on to its deadline
        message = decode(line)
        if message is not None and message.get("op") == "stop":
            drain.kill()
            app.stop(0)
            return


def fork_workers(app, count, handover=None):
    """Fork ``count`` workers running ``app``'s data path; returns the parent's WorkerSet.

    ``handover`` (a live upgrade): one Unix socket path per worker, where it
    waits for the old worker of the same index to give it its listeners and
    sessions (``handover.take_at``)."""
    channels = []
    folder = tempfile.mkdtemp(prefix="gproxy-workers-")  # each worker's import socket
    for index in range(count):
        parent_end, child_end = socket.socketpair()
        pid = os.fork()
        if pid == 0:  # the worker
            parent_end.close()
            for ch in channels:
                ch.close()
            _run_worker(app, index, child_end, handover and handover[index],
                        os.path.join(folder, "worker-%d.sock" % index))
        child_end.close()
        channel = Channel(pid, gevent.socket.socket(fileno=parent_end.detach()))
        channels.append(channel)
        hello = channel.hello(ACK_TIMEOUT * 2)
        if hello is None or not hello.get("ready"):
            WorkerSet(channels, folder=folder, **app.evict_options).stop(0)
            raise OSError("worker %d did not start: %s"
                          % (index, (hello or {}).get("error", "timed out")))
    return WorkerSet(channels, everything=app.everything, folder=folder,
                     **app.evict_options)
