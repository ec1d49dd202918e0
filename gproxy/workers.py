"""``--workers N``: N forked proxy processes behind SO_REUSEPORT listeners.

The parent keeps the store, the Admin API and the dashboard; each worker
binds the stream listeners itself with SO_REUSEPORT (the kernel spreads new
connections across them) and runs the data path.  They talk over one Unix
socketpair per worker, one JSON line per message:

    parent -> worker  {"op": "table", "data": {...}}   worker -> {"ok": true}
                      {"op": "sessions"} / {"op": "stats"} / {"op": "close", "id": ...}
                      {"op": "close_where", "route_id": ...} / {"op": "stop"}

A store write pushes the new data to every worker and waits for each ack
before the Admin API answers, so "in effect when the response is sent" holds
across processes.  ``WorkerSet`` offers the Registry's read/close interface,
merging what the workers report, so the Admin API and dashboard show the live
sessions of all workers.  A worker whose parent dies sees EOF and exits.
"""

import json
import logging
import os
import signal
import socket
import sys
from collections import Counter

import gevent
import gevent.socket
from gevent.lock import Semaphore

log = logging.getLogger("gproxy.workers")

ACK_TIMEOUT = 5.0


class _Channel:
    """One worker's control socket, used by one request at a time."""

    def __init__(self, pid, sock):
        self.pid = pid
        self.sock = sock
        self.file = sock.makefile("rwb")
        self.lock = Semaphore()

    def call(self, message, timeout=ACK_TIMEOUT):
        with self.lock:
            with gevent.Timeout(timeout):
                self.file.write(json.dumps(message).encode() + b"\n")
                self.file.flush()
                line = self.file.readline()
        if not line:
            raise OSError("worker %d closed its control channel" % self.pid)
        return json.loads(line)


class WorkerSet:
    """The parent's view of its workers; quacks like a Registry for the Admin API."""

    def __init__(self, channels):
        self.channels = channels

    def _all(self, message):
        replies = []
        for ch in self.channels:
            try:
                replies.append(ch.call(message))
            except (OSError, ValueError, gevent.Timeout) as exc:
                log.error("worker %d did not answer %s: %s", ch.pid, message["op"], exc)
        return replies

    def push_table(self, data):
        self._all({"op": "table", "data": data})

    def snapshot(self):
        out = []
        for reply in self._all({"op": "sessions"}):
            out.extend(reply["list"])
        return sorted(out, key=lambda s: s["connected_at"])

    def stats(self):
        total = Counter()
        rejected, per_node = Counter(), Counter()
        started = []
        for reply in self._all({"op": "stats"}):
            for key in ("live_sessions", "sessions_total", "bytes_in", "bytes_out"):
                total[key] += reply[key]
            rejected.update(reply["rejected"])
            per_node.update(reply["per_node"])
            started.append(reply["started_at"])
        return dict(total, rejected=dict(rejected), per_node=dict(per_node),
                    started_at=min(started, default=0), workers=len(self.channels))

    def close(self, session_id):
        return any(r.get("closed") for r in self._all({"op": "close", "id": session_id}))

    def close_where(self, route_id=None):
        closed = []
        for reply in self._all({"op": "close_where", "route_id": route_id}):
            closed.extend(reply["closed"])
        return closed

    def __len__(self):
        return sum(r["live_sessions"] for r in self._all({"op": "stats"}))

    def stop(self, timeout):
        for ch in self.channels:
            try:
                ch.call({"op": "stop", "timeout": timeout}, timeout=timeout + 5)
            except (OSError, ValueError, gevent.Timeout):
                pass
        for ch in self.channels:
            try:
                os.waitpid(ch.pid, 0)
            except ChildProcessError:
                pass
            ch.sock.close()


def serve_control(app, sock):
    """Worker side: answer the parent until it says stop or goes away."""
    handlers = {
        "table": lambda m: (app.set_data(m["data"]), {"ok": True})[1],
        "sessions": lambda m: {"list": app.registry.snapshot()},
        "stats": lambda m: app.registry.stats(),
        "close": lambda m: {"closed": app.registry.close(m["id"])},
        "close_where": lambda m: {"closed": app.registry.close_where(m.get("route_id"))},
    }
    stream = sock.makefile("rwb")
    while True:
        line = stream.readline()
        if not line:
            log.warning("worker %d: parent went away; stopping", os.getpid())
            return 0.0
        message = json.loads(line)
        if message["op"] == "stop":
            stream.write(b'{"ok": true}\n')
            stream.flush()
            return float(message.get("timeout", 10.0))
        try:
            reply = handlers[message["op"]](message)
        except Exception as exc:  # a bad request must not kill the worker
            log.exception("worker: %s failed", message.get("op"))
            reply = {"error": str(exc)}
        stream.write(json.dumps(reply).encode() + b"\n")
        stream.flush()


def fork_workers(app, count):
    """Fork ``count`` workers running ``app``'s data path; returns the parent's WorkerSet."""
    channels = []
    for index in range(count):
        parent_end, child_end = socket.socketpair()
        pid = os.fork()
        if pid == 0:  # the worker
            parent_end.close()
            for ch in channels:
                ch.sock.close()
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent coordinates shutdown
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            code = 0
            ctl = gevent.socket.socket(fileno=child_end.detach())
            try:
                try:
                    app.start_worker(index)
                except OSError as exc:
                    ctl.sendall(json.dumps({"error": str(exc)}).encode() + b"\n")
                    raise
                ctl.sendall(b'{"ready": true}\n')
                app.stop(serve_control(app, ctl))
            except BaseException:
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        child_end.close()
        channel = _Channel(pid, gevent.socket.socket(fileno=parent_end.detach()))
        channels.append(channel)
        hello = None
        with gevent.Timeout(ACK_TIMEOUT * 2, False):
            hello = json.loads(channel.file.readline() or b'{"error": "no answer"}')
        if hello is None or not hello.get("ready"):
            WorkerSet(channels).stop(0)
            raise OSError("worker %d did not start: %s"
                          % (index, (hello or {}).get("error", "timed out")))
    return WorkerSet(channels)
