"""The host's end of the process mode's channel: requests from any thread, one reader.

Requests are JSON lines with ids; a reply is a JSON line, followed by
``len`` raw bytes when it carries a body (an Admin API answer travels
unescaped); a line with ``log`` is a log record of the child's.  A request
can wait for its reply (``call``) or go now and be waited for later
(``request``: a ``Future``), as a live upgrade of the child does with the
new child's start while the old one hands over.  An exception the child
reported is raised again here as the same type where it is one of Python's
or gproxy's (``rebuild``).  Imports no gevent.
"""

import builtins
import itertools
import json
import socket
import threading
from concurrent.futures import Future

from gproxy import errors
from gproxy.errors import ProxyStopped
from gproxy.runtime.lines import LineReader


class Channel:
    """The host's end of the socketpair: requests with ids from any thread, one reader.

    Requests are JSON lines; a reply is a JSON line, followed by ``len`` raw
    bytes when it carries a body (an Admin API answer travels unescaped).
    """

    def __init__(self, sock, on_log):
        self.sock = sock
        self.on_log = on_log
        self.reader = LineReader(sock)
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._pending = {}
        self._closed = None  # why, once it is
        self.stopping = False  # the handle asked it to stop: its exit is no news

    def call(self, message, timeout=None):
        """Send ``message``; the reply (a dict), or the exception the child reported."""
        return self.reply(self.request(message), timeout)

    def request(self, message):
        """Send ``message`` now; a Future of its reply (``reply`` waits for it)."""
        future = Future()
        with self._lock:
            if self._closed:
                raise ProxyStopped(self._closed)
            request_id = next(self._ids)
            self._pending[request_id] = future
            try:
                self.sock.sendall(b"\n" + json.dumps(dict(message, id=request_id)).encode()
                                  + b"\n")
            except OSError:
                self._pending.pop(request_id, None)
                raise ProxyStopped("gproxy's process has exited") from None
        future.request_id = request_id
        return future

    def reply(self, future, timeout=None):
        """The reply of a ``request``, or the exception the child reported."""
        try:
            reply = future.result(timeout)
        except TimeoutError:
            with self._lock:
                self._pending.pop(future.request_id, None)
            raise
        if "error" in reply:
            raise rebuild(reply["error"])
        return reply

    def read_until_closed(self, pid):
        try:
            while True:
                line = self.reader.readline()
                if not line:
                    break
                head = json.loads(line)
                if "log" in head:
                    self.on_log(head["log"])
                    continue
                if "len" in head:
                    head["body"] = self.reader.read_exactly(head.pop("len")).decode("utf-8")
                future = self._pending.pop(head.get("id"), None)
                if future is not None:
                    future.set_result(head)
        except (EOFError, OSError, ValueError):
            pass
        self._fail("gproxy has stopped" if self.stopping else
                   "gproxy's process (pid %d) has exited" % pid)

    def _fail(self, why):
        with self._lock:
            self._closed = self._closed or why
            pending, self._pending = self._pending, {}
        for future in pending.values():
            future.set_exception(ProxyStopped(self._closed))

    def close(self):
        self._fail("gproxy has stopped")
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the reader if the child still lives
        except OSError:
            pass
        self.sock.close()

    def abandon(self, owner):
        """In a forked child: close this copy of the host's end, never write to it."""
        self._closed = ("this gproxy runs for process %d; a forked child cannot use its "
                        "handle (call the Admin API over HTTP instead)" % owner)
        self._pending = {}
        self.sock.close()


def rebuild(info):
    """The exception the child reported, as the same type where it is a known one."""
    name, args = info.get("type"), info.get("args") or [info.get("message", "")]
    module = errors if info.get("module") == "gproxy.errors" else builtins
    cls = getattr(module, name, None)
    exc = None
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            exc = cls(*args)
        except Exception:  # a constructor of its own: fall back below
            exc = None
    if exc is None:
        exc = RuntimeError("%s: %s" % (name, info.get("message", "")))
    if info.get("traceback") and hasattr(exc, "add_note"):
        exc.add_note("raised in gproxy's process:\n" + info["traceback"].rstrip())
    return exc
