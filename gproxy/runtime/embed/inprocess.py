"""``mode="process"``: gproxy in a child process the handle owns.

``ProcessProxy`` starts a fresh interpreter (never a fork of the host: the
host's threads, locks and patches stay out) running ``gproxy --embedded-by
PID`` (``embed.child``), which imports gproxy from the host's own
``sys.path`` and inherits only the descriptors it needs: stdin/stdout on
``/dev/null``, the host's stderr, and its end of a socketpair.  That
socketpair is the channel (``hostend``): the config goes down it, the bound
addresses or the start-up error come back (re-raised here as the same
exception type), then the Admin API calls, ``stop``, and the child's log
records, which are handed to the host's ``logging`` under the same
``gproxy.*`` names.

It is also the child's lifeline: when the host dies, even by SIGKILL, its
end closes and the child stops; ``PR_SET_PDEATHSIG`` covers a copy of the
host's end held by a grandchild.  The reader thread that starts the child
lives as long as the child, because that signal is tied to the thread that
forked.

Because the handle owns the child, it can replace it without the host
restarting: ``upgrade()`` starts a new child (the gproxy now on disk, the
config file as it is now) waiting at a private Unix socket path, asks the
old one to hand it every listener and live session (the ``gproxy``
command's live upgrade: same state, same two-phase commit), and swaps the
channel once the new child serves.  If anything fails before the commit,
the old child keeps everything and the new one goes.  Imports no gevent:
the host loads nothing of the data path.
"""

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future

from gproxy.errors import ConfigError, HandoverError, ProxyStopped
from gproxy.runtime.embed.handle import EmbeddedProxy, load_config
from gproxy.runtime.embed.hostend import Channel

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

    def __init__(self, cfg, workers=1, python=None, take_over=None, timeout=60.0):
        super().__init__(cfg)
        self.workers = workers
        self.python = python or _interpreter()
        self.pid = None  # the child's
        self._child = None
        self._take_over = (take_over, timeout)
        self._upgrading = threading.Lock()

    # -- starting ----------------------------------------------------------
    def _launch(self):
        path, timeout = self._take_over
        child = Child(self.python)
        self.pid = child.pid
        ready = child.start(self._start_message(path, timeout),
                            START_TIMEOUT + (timeout if path else 0))
        self._serve_with(child, ready)

    def _serve_with(self, child, ready):
        self._child, self.pid = child, child.pid
        self.addresses = [tuple(a) for a in ready["addresses"]]
        self.admin_address = tuple(ready["admin_address"]) if ready["admin_address"] else None

    def _start_message(self, take_over=None, timeout=None, cfg=None):
        cfg = cfg or self.cfg
        defaults = cfg.raw == {} and cfg.path is None and cfg.stream_enabled  # Config()
        message = {"op": "start", "raw": None if defaults else cfg.raw,
                   "path": os.path.abspath(cfg.path) if cfg.path else None,
                   "workers": self.workers,
                   "level": logging.getLogger("gproxy").getEffectiveLevel()}
        if take_over is not None:
            message["take_over"] = {"path": os.path.abspath(take_over), "timeout": timeout}
        return message

    # -- calls -------------------------------------------------------------
    def _request(self, method, path, data, query):
        reply = self._child.channel.call({"op": "admin", "method": method, "path": path,
                                          "data": data, "query": query})
        return reply["status"], reply["body"]

    def _reopen_logs(self):
        self._child.channel.call({"op": "reopen"})

    def _hand_over(self, path):
        return self._child.channel.call({"op": "hand_over", "path": os.path.abspath(path)})[
            "moved"]

    # -- upgrading the child -------------------------------------------------
    def upgrade(self, timeout=60.0, grace=5.0):
        """Replace the child by a new one running the gproxy on disk now (and the
        config file as it is now), which takes every listener and live session;
        the host goes on.  Returns how many sessions moved; raises
        ``HandoverError`` (the old child still serves everything, the new one is
        gone) if the new child cannot start or take over within ``timeout`` s.
        What cannot move (TLS sessions) ends in the old child within ``grace``."""
        self._check_owner()
        with self._upgrading:
            if self._stopped:
                raise ProxyStopped("this gproxy was stopped")
            cfg = self._config_now()
            folder = tempfile.mkdtemp(prefix="gproxy-upgrade-")
            try:
                return self._upgrade(cfg, os.path.join(folder, "handover.sock"), timeout,
                                     grace)
            finally:
                shutil.rmtree(folder, ignore_errors=True)

    def _config_now(self):
        """The config file as it is now (the gproxy command's upgrade reads it again
        too); a config given as a dict stays as it was."""
        if self.cfg.path is None:
            return self.cfg
        try:
            return load_config(self.cfg.path)
        except ConfigError as exc:
            raise HandoverError("%s; the old process keeps every session and listener"
                                % exc) from exc

    def _upgrade(self, cfg, path, timeout, grace):
        old, new, started, moved = self._child, None, None, None
        try:
            new = Child(self.python)
            started = new.channel.request(self._start_message(path, timeout, cfg))
            _wait_for(path, started, timeout)
            moved = self._hand_over(path)
            ready = new.channel.reply(started, START_TIMEOUT + timeout)
        except Exception as exc:
            if new is not None:
                new.dismiss(started)
            if moved is not None:  # past the commit: everything went with the new child
                old.stop(grace)
                raise ProxyStopped("gproxy's new process (pid %s) took over and then failed: "
                                   "%s" % (new.pid, exc)) from exc
            if isinstance(exc, HandoverError):
                raise
            raise HandoverError("%s; the old one keeps every session and listener"
                                % _why(new, exc)) from exc
        self.cfg = cfg
        self._serve_with(new, ready)
        old.stop(grace)
        logging.getLogger("gproxy.upgrade").warning(
            "upgrade: gproxy's process is pid %d now (was %d): %d sessions moved",
            new.pid, old.pid, moved)
        return moved

    # -- stopping ----------------------------------------------------------
    def _shutdown(self, grace):
        with self._upgrading:  # an upgrade under way finishes first (its steps are bounded)
            self._child.stop(grace)

    def _release_in_child(self):
        self._child.channel.abandon(self._owner)


def _why(child, exc):
    code = child.proc.returncode if child is not None else None
    if isinstance(exc, ProxyStopped) and code is not None:
        return ("the new gproxy process (%s, pid %d) exited with status %s before it took "
                "over (its stderr says why)" % (child.python, child.pid, code))
    return "the new gproxy process did not take over (%s: %s)" % (type(exc).__name__, exc)


def _wait_for(path, started, timeout):
    """Until the new child listens at ``path`` (or has failed: its start raises)."""
    deadline = time.monotonic() + START_TIMEOUT + timeout
    while not os.path.exists(path):
        if started.done():
            started.result()  # an error reply or ProxyStopped: raised by reply()
            raise HandoverError("the new gproxy process answered before it took over")
        if time.monotonic() > deadline:
            raise HandoverError("the new gproxy process did not wait at %s" % path)
        time.sleep(0.01)


class Child:
    """One gproxy process of the handle: its channel, and the thread that started
    it and reads the channel until it exits."""

    def __init__(self, python):
        self.python = python
        self.pid = None
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.channel = Channel(parent_end, self._log)
        spawned = Future()
        self.thread = threading.Thread(target=self._serve_channel, args=(child_end, spawned),
                                       name="gproxy-channel", daemon=True)
        self.thread.start()
        try:
            self.proc = spawned.result()
        except BaseException:  # no interpreter there, say: nothing to wait for
            self.channel.close()
            raise
        finally:
            child_end.close()
        self.pid = self.proc.pid

    def start(self, message, timeout):
        """Send the start message; the ready reply (what went wrong raised, the child reaped)."""
        try:
            return self.channel.call(message, timeout)
        except ProxyStopped:  # it died before it could say why
            self.reap(EXIT_TIMEOUT)
            raise ProxyStopped("gproxy's process (%s, pid %d) exited with status %s before it "
                               "was ready; its stderr says why" % (
                                   self.python, self.pid, self.proc.returncode)) from None
        except BaseException:  # the child reported it, or never answered
            self.reap(EXIT_TIMEOUT)
            raise

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
        self.pid = proc.pid  # before any log record of its can come
        spawned.set_result(proc)
        self.channel.read_until_closed(proc.pid)

    def _command(self, fd):
        return [self.python, "-I", "-c", BOOT, "--embedded-by", str(os.getpid()),
                "--channel-fd", str(fd)]

    @staticmethod
    def _env():
        env = dict(os.environ)
        env["GPROXY_SYS_PATH"] = json.dumps([p if p else os.getcwd() for p in sys.path])
        return env

    def _log(self, entry):
        """A log record from the child, handed to this program's ``logging``."""
        name, level, message, exc_text = entry
        logger = logging.getLogger(name)
        if logger.isEnabledFor(level):
            record = logger.makeRecord(name, level, "(gproxy)", 0, message, None, None)
            record.exc_text = exc_text
            record.process, record.processName = self.pid, "gproxy"
            logger.handle(record)

    def stop(self, grace):
        """Drain and exit (killed if it has not ``grace`` + margins later), reaped."""
        self.channel.stopping = True
        try:
            self.channel.call({"op": "stop", "grace": grace}, grace + STOP_MARGIN)
        except (ProxyStopped, TimeoutError):
            pass  # already gone (killed, or stopped by SIGTERM), or hung: reaped below
        finally:
            self.reap(EXIT_TIMEOUT)

    def dismiss(self, started):
        """A new child that will not take over: it stops by itself once its old one
        calls the handover off (its start then fails); killed if it does not."""
        self.channel.stopping = True
        try:
            if started is not None:
                self.channel.reply(started, STOP_MARGIN)
        except Exception:  # noqa: BLE001 (the failure we expect, or none: reaped anyway)
            pass
        self.reap(EXIT_TIMEOUT)

    def reap(self, timeout):
        """Wait for the child to exit (SIGKILL it after ``timeout``), close the channel."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.channel.close()
        self.thread.join(EXIT_TIMEOUT)


def _interpreter():
    if getattr(sys, "frozen", False) or not sys.executable:
        raise RuntimeError("gproxy.start(mode='process') runs gproxy in a Python interpreter "
                           "and this program has none at sys.executable: pass "
                           "python='/path/to/python', or use mode='thread'")
    return sys.executable
