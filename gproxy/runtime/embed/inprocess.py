"""``mode="process"``: gproxy in a child process the handle owns.

``ProcessProxy`` starts a fresh interpreter (never a fork of the host: the
host's threads, locks and patches stay out) running ``gproxy --embedded-by
PID`` (``embed.child``), which imports gproxy from the host's own
``sys.path`` and inherits only the descriptors it needs: stdin/stdout on
``/dev/null``, the host's stderr, and its end of a socketpair.  That
socketpair is the channel: the config goes down it, the bound addresses or
the start-up error come back (re-raised here as the same exception type),
then the Admin API calls, ``stop``, and the child's log records, which are
handed to the host's ``logging`` under the same ``gproxy.*`` names.

It is also the child's lifeline: when the host dies, even by SIGKILL, its
end closes and the child stops; ``PR_SET_PDEATHSIG`` covers a copy of the
host's end held by a grandchild.  The reader thread that starts the child
lives as long as the handle, because that signal is tied to the thread that
forked.  Imports no gevent: the host loads nothing of the data path.
"""

import builtins
import itertools
import json
import logging
import os
import socket
import subprocess
import sys
import threading
from concurrent.futures import Future

from gproxy import errors
from gproxy.errors import ProxyStopped
from gproxy.runtime.embed.handle import EmbeddedProxy
from gproxy.runtime.lines import LineReader

START_TIMEOUT = 120.0  # a store behind a slow etcd, on a loaded machine
STOP_MARGIN = 10.0  # beyond the grace, before the child is killed
EXIT_TIMEOUT = 5.0
#: The child's interpreter imports gproxy from the host's sys.path, as multiprocessing's
#: spawn does, so a host running from a checkout or a zipapp gets the same gproxy.
BOOT = ("import json, os, sys; sys.path[:] = json.loads(os.environ.pop('GPROXY_SYS_PATH')); "
        "from gproxy.cli import main; sys.exit(main())")


class ProcessProxy(EmbeddedProxy):
    """gproxy in a child process of this one."""

    mode = "process"

    def __init__(self, cfg, workers=1, python=None):
        super().__init__(cfg)
        self.workers = workers
        self.python = python or _interpreter()
        self.pid = None  # the child's
        self._proc = None
        self._channel = None
        self._thread = None

    # -- starting ----------------------------------------------------------
    def _launch(self):
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._channel = Channel(parent_end, self._log)
        spawned = Future()
        self._thread = threading.Thread(target=self._serve_channel, args=(child_end, spawned),
                                        name="gproxy-channel", daemon=True)
        self._thread.start()
        try:
            self._proc = spawned.result()
        except BaseException:  # no interpreter there, say: nothing to wait for
            self._channel.close()
            raise
        finally:
            child_end.close()
        self.pid = self._proc.pid
        try:
            ready = self._channel.call(self._start_message(), START_TIMEOUT)
        except ProxyStopped:  # it died before it could say why
            self._reap(EXIT_TIMEOUT)
            raise ProxyStopped("gproxy's process (%s, pid %d) exited with status %s before it "
                               "was ready; its stderr says why" % (
                                   self.python, self.pid, self._proc.returncode)) from None
        except BaseException:  # the child reported it, or never answered
            self._reap(EXIT_TIMEOUT)
            raise
        self.addresses = [tuple(a) for a in ready["addresses"]]
        self.admin_address = tuple(ready["admin_address"]) if ready["admin_address"] else None

    def _start_message(self):
        cfg = self.cfg
        defaults = cfg.raw == {} and cfg.path is None and cfg.stream_enabled  # Config()
        return {"op": "start", "raw": None if defaults else cfg.raw,
                "path": os.path.abspath(cfg.path) if cfg.path else None,
                "workers": self.workers, "level": logging.getLogger("gproxy").getEffectiveLevel()}

    def _serve_channel(self, child_end, spawned):
        """The reader thread: start the child from here (its death signal follows this
        thread), then read replies and log records until the child's end closes."""
        try:
            proc = subprocess.Popen(self._command(child_end.fileno()), env=self._env(),
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    pass_fds=(child_end.fileno(),), close_fds=True,
                                    start_new_session=True)
        except BaseException as exc:
            spawned.set_exception(exc)
            return
        spawned.set_result(proc)
        self._channel.read_until_closed(proc.pid)

    def _command(self, fd):
        return [self.python, "-I", "-c", BOOT, "--embedded-by", str(os.getpid()),
                "--channel-fd", str(fd)]

    @staticmethod
    def _env():
        env = dict(os.environ)
        env["GPROXY_SYS_PATH"] = json.dumps([p if p else os.getcwd() for p in sys.path])
        return env

    # -- calls -------------------------------------------------------------
    def _request(self, method, path, data, query):
        reply = self._channel.call({"op": "admin", "method": method, "path": path,
                                    "data": data, "query": query})
        return reply["status"], reply["body"]

    def _reopen_logs(self):
        self._channel.call({"op": "reopen"})

    def _log(self, entry):
        """A log record from the child, handed to this program's ``logging``."""
        name, level, message, exc_text = entry
        logger = logging.getLogger(name)
        if logger.isEnabledFor(level):
            record = logger.makeRecord(name, level, "(gproxy)", 0, message, None, None)
            record.exc_text = exc_text
            record.process, record.processName = self.pid, "gproxy"
            logger.handle(record)

    # -- stopping ----------------------------------------------------------
    def _shutdown(self, grace):
        self._channel.stopping = True
        try:
            self._channel.call({"op": "stop", "grace": grace}, grace + STOP_MARGIN)
        except (ProxyStopped, TimeoutError):
            pass  # already gone (killed, or stopped by SIGTERM), or hung: reaped below
        finally:
            self._reap(EXIT_TIMEOUT)

    def _reap(self, timeout):
        """Wait for the child to exit (SIGKILL it after ``timeout``), close the channel."""
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._channel.close()
        self._thread.join(EXIT_TIMEOUT)

    def _release_in_child(self):
        self._channel.abandon(self._owner)


def _interpreter():
    if getattr(sys, "frozen", False) or not sys.executable:
        raise RuntimeError("gproxy.start(mode='process') runs gproxy in a Python interpreter "
                           "and this program has none at sys.executable: pass "
                           "python='/path/to/python', or use mode='thread'")
    return sys.executable


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
        try:
            reply = future.result(timeout)
        except TimeoutError:
            with self._lock:
                self._pending.pop(request_id, None)
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
