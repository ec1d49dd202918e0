"""The process behind ``gproxy.start(mode="process")``: ``gproxy --embedded-by PID``.

The CLI patches, raises the descriptor limit and hands over the socketpair;
``run`` reads the config from it, starts a ``Gproxy`` as the command does,
answers ``{"ready", "addresses", ...}`` or the exception that stopped it,
then serves the host's requests, each in its own greenlet:

    {"op": "admin", "method", "path", "data", "query"} -> {"status", "len"} + body
    {"op": "reopen"}                                   -> the access log reopened, {"ok": true}
    {"op": "hand_over", "path": p}                     -> every listener and session to
                                                          the gproxy waiting at p, {"moved": n}
    {"op": "stop", "grace": g}                         -> drain, {"ok": true}, exit

A start message with ``take_over: {"path", "timeout"}`` waits at that path
for another gproxy's ``hand_over`` and starts on what it hands over
(``runtime.transfer``), instead of binding: the host program's own live
upgrade, or the handle's ``upgrade()`` of its child.

and sends every log record up as ``{"log": [name, level, message, exc_text]}``.
It ends when the host says stop, when SIGTERM comes (drains with
``gproxy.shutdown.grace``; a second one forces), and when the host is gone:
the channel reaches EOF, or ``PR_SET_PDEATHSIG`` sends that SIGTERM.  SIGINT
and SIGHUP belong to the host (a Ctrl-C in its terminal reaches the whole
process group; the host decides).
"""

import collections
import ctypes
import json
import logging
import os
import signal
import socket
import traceback

import gevent
import gevent.event
import gevent.socket

from gproxy.runtime.channel import LineReader, decode, encode
from gproxy.runtime.embed.local import local_admin, request

log = logging.getLogger("gproxy.embedded")

PR_SET_PDEATHSIG = 1
OUTBOX_LIMIT = 10000  # log records waiting for a host that does not read


def die_with(host_pid, sig=signal.SIGTERM):
    """Ask the kernel for ``sig`` when the host goes; False if it is gone already."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the channel's EOF still tells
        pass
    return os.getppid() == host_pid


def describe(exc):
    """An exception as JSON, for the host to raise again (``inprocess.rebuild``)."""
    args = list(exc.args)
    if isinstance(exc, OSError) and exc.errno is not None and exc.filename is not None:
        args = [exc.errno, exc.strerror, exc.filename]  # kept apart from args by OSError
    try:
        json.dumps(args)
    except (TypeError, ValueError):
        args = [str(exc)]
    return {"type": type(exc).__name__, "module": type(exc).__module__, "args": args,
            "message": str(exc), "traceback": traceback.format_exc()}


class Outbox:
    """Everything the child sends, in order, from one greenlet; log records may
    come from any thread (they are queued through the loop)."""

    def __init__(self, sock):
        self.sock = sock
        self.queue = collections.deque()
        self.dropped = 0
        self.wake = gevent.event.Event()
        self.loop = gevent.get_hub().loop
        self.writer = gevent.spawn(self._write)

    def put(self, head, body=None):
        data = encode(head) if body is None else encode(dict(head, len=len(body))) + body
        self.queue.append(data)
        self.wake.set()

    def put_log(self, entry):
        if len(self.queue) >= OUTBOX_LIMIT:
            self.dropped += 1
            return
        self.loop.run_callback_threadsafe(self.put, {"log": entry})

    def _write(self):
        while True:
            self.wake.wait()
            self.wake.clear()
            while self.queue:
                try:
                    self.sock.sendall(self.queue.popleft())
                except OSError:  # the host is gone: nothing more to say
                    self.queue.clear()
                    return

    def flush(self, timeout=5.0):
        with gevent.Timeout(timeout, False):
            while self.queue and not self.writer.dead:
                gevent.sleep(0.01)


class LogToHost(logging.Handler):
    """Log records up the channel, for the host's ``logging`` to handle."""

    def __init__(self, outbox, level):
        super().__init__(level)
        self.outbox = outbox

    def emit(self, record):
        try:
            exc_text = self.formatter.formatException(record.exc_info) if record.exc_info \
                else None
            self.outbox.put_log([record.name, record.levelno, record.getMessage(), exc_text])
        except Exception:
            self.handleError(record)


def run(channel_fd, host_pid, after_start):
    """The child's main: start, serve, stop; the exit status."""
    sock = gevent.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=channel_fd)
    reader, outbox = LineReader(sock), Outbox(sock)
    first = decode(reader.readline() or b"null") or {}
    handler = LogToHost(outbox, first.get("level", logging.WARNING))
    handler.setFormatter(logging.Formatter())
    logging.getLogger().handlers[:] = [handler]
    logging.getLogger().setLevel(handler.level)
    try:
        app = _start(first)
    except BaseException as exc:  # carried to the host, raised there
        outbox.put({"id": first.get("id"), "error": describe(exc)})
        outbox.flush()
        return 1
    outbox.put({"id": first["id"], "ready": True, "pid": os.getpid(),
                "addresses": _addresses(app), "admin_address": _admin_address(app)})
    after_start(app)
    return Serving(app, reader, outbox, host_pid).run()


def _start(first):
    from gproxy.config import Config
    from gproxy.runtime.app import Gproxy
    if first.get("op") != "start":
        raise RuntimeError("gproxy --embedded-by: expected the start message first")
    take_over = first.get("take_over")
    app = Gproxy(Config(first["raw"], first["path"]), standby=take_over is not None)
    if take_over is None:
        app.start(workers=first.get("workers", 1))
        return app
    from gproxy.runtime.transfer import take_over_at
    try:
        moved = take_over_at(app, take_over["path"], take_over["timeout"],
                             first.get("workers", 1))
    except BaseException:
        app.store.close()
        raise
    log.warning("upgrade: took over %s sessions", "the workers'" if moved is None else moved)
    return app


def _addresses(app):
    """The stream listeners' addresses (with workers, each worker binds the configured ones)."""
    if app.workers is None:
        return app.addresses
    return [(spec.host, spec.port) for spec in app.cfg["apisix.stream_proxy.tcp"]]


def _admin_address(app):
    server = app.admin_server
    return None if server is None else [server.server_host, server.server_port]


class Serving:
    """Requests from the host until a stop (the host's, SIGTERM's, or its absence)."""

    def __init__(self, app, reader, outbox, host_pid):
        self.app, self.reader, self.outbox, self.host_pid = app, reader, outbox, host_pid
        self.client = local_admin(app, app.cfg)
        self.stop = gevent.event.AsyncResult()  # the grace period, once set
        self.waiting = []  # ids of stop requests, answered once stopped
        self.terms = 0

    def run(self):
        gevent.signal_handler(signal.SIGTERM, self._sigterm)
        gevent.spawn(self._requests)
        drain = gevent.spawn(self._drain, self.stop.get())
        while not drain.ready():
            gevent.sleep(0.05)
            if self.terms > 1:  # a second SIGTERM forces, as for the gproxy command
                drain.kill()
                self.app.stop(0)
                break
        self.app.store.close()
        for request_id in self.waiting:
            self.outbox.put({"id": request_id, "ok": True})
        self.outbox.flush()
        return 0

    def _drain(self, grace):
        self.app.stop(grace)

    def _sigterm(self):
        self.terms += 1
        if not self.stop.ready():
            gone = os.getppid() != self.host_pid
            log.warning("%s: stopping", "the host process is gone" if gone else "SIGTERM")
            self.stop.set(self.app.cfg["gproxy.shutdown.grace"])

    def _requests(self):
        while True:
            line = self.reader.readline()
            if not line:
                if not self.stop.ready():
                    log.warning("the host process closed the channel: stopping")
                    self.stop.set(self.app.cfg["gproxy.shutdown.grace"])
                return
            message = decode(line)
            if message is None:
                continue
            if message.get("op") == "stop":
                self.waiting.append(message.get("id"))
                if not self.stop.ready():
                    self.stop.set(float(message.get("grace", 5.0)))
            else:
                gevent.spawn(self._answer, message)

    def _answer(self, message):
        request_id, op = message.get("id"), message.get("op")
        try:
            if op == "reopen":
                self.app.reopen_logs()
                self.outbox.put({"id": request_id, "ok": True})
            elif op == "hand_over":
                from gproxy.runtime.transfer import give_all
                moved = give_all(self.app, message["path"])
                self.outbox.put({"id": request_id, "moved": moved})
            elif op == "admin":
                status, text = request(self.client, message["method"], message["path"],
                                       message.get("data"), message.get("query"))
                self.outbox.put({"id": request_id, "status": status}, text.encode("utf-8"))
            else:
                raise ValueError("unknown op %r" % (op,))
        except Exception as exc:  # raised in the host's thread, as in thread mode
            self.outbox.put({"id": request_id, "error": describe(exc)})
