"""The handle ``gproxy.start`` returns, whichever way the proxy runs.

``EmbeddedProxy`` owns what the thread and the process mode share: the
Admin API calls (``routes``, ``upstreams``, ``admin``, ``sessions``,
``stats``) turned into dicts or ``AdminError``; the bound addresses; one
``stop`` from any thread, and one at the host's exit if it never called it;
and what a forked child of the host may do with the handle it inherited
(nothing: ``stop`` is a no-op there, every other call raises
``ProxyStopped``; ``forks`` lets go of the descriptors); and the host
program's own live upgrade: ``hand_over(path)`` in its old process,
``start(take_over=path)`` in its new one (the host decides when: gproxy
cannot replace the host's process).  A mode supplies ``_launch``,
``_request``, ``_shutdown``, ``_hand_over`` and ``_release_in_child``.

It imports no gevent and nothing of the data path: in process mode this and
``inprocess`` are all the host loads.
"""

import atexit
import copy
import json
import os
import threading

from gproxy import config as config_mod
from gproxy.errors import ProxyStopped
from gproxy.runtime.embed import forks

ADMIN = "/apisix/admin"


class AdminError(Exception):
    """An Admin API refusal: ``status``, the JSON ``body`` and its ``error_msg``."""

    def __init__(self, status, body):
        self.status = status
        self.body = body
        message = body.get("error_msg") or body.get("message") if isinstance(body, dict) else body
        self.error_msg = message
        super().__init__("%d: %s" % (status, message))


def load_config(config):
    """A Config from a path, a dict with config.yaml's keys, a Config, or None."""
    if config is None:
        return config_mod.Config()
    if isinstance(config, config_mod.Config):
        return config
    if isinstance(config, dict):
        return config_mod.Config(copy.deepcopy(config))
    return config_mod.load(os.fspath(config))


class Resource:
    """``proxy.routes`` / ``proxy.upstreams``: the Admin API for one resource."""

    def __init__(self, proxy, name):
        self._proxy = proxy
        self._path = "%s/%s" % (ADMIN, name)

    def put(self, id_, body):
        return self._proxy.admin("PUT", "%s/%s" % (self._path, id_), body)

    def post(self, body):
        return self._proxy.admin("POST", self._path, body)

    def get(self, id_):
        return self._proxy.admin("GET", "%s/%s" % (self._path, id_))

    def list(self, **filters):
        return self._proxy.admin("GET", self._path, query=filters)

    def delete(self, id_, force=False):
        return self._proxy.admin("DELETE", "%s/%s" % (self._path, id_),
                                 query={"force": "true"} if force else None)

    def patch(self, id_, body, sub_path=None):
        path = "%s/%s" % (self._path, id_) + ("/" + sub_path if sub_path else "")
        return self._proxy.admin("PATCH", path, body)


class EmbeddedProxy:
    """The handle ``gproxy.start`` returns; a context manager that stops on exit."""

    mode = None  # "thread" or "process"

    def __init__(self, cfg):
        self.cfg = cfg
        self.routes = Resource(self, "stream_routes")
        self.upstreams = Resource(self, "upstreams")
        self.addresses = []  # bound (host, port) of every stream listener
        self.admin_address = None  # (host, port) of the Admin API, when it is on
        self._owner = os.getpid()  # the process that started it, the only one that may call
        self._stop_lock = threading.Lock()
        self._stopped = False

    # -- life cycle --------------------------------------------------------
    def _start(self):
        """Run the proxy (``_launch`` raises what went wrong, leaving nothing behind)."""
        self._launch()
        forks.adopt(self)
        atexit.register(self._at_exit)
        return self

    @property
    def port(self):
        """The first stream listener's port."""
        return self.addresses[0][1]

    def stop(self, grace=5.0):
        """Stop accepting, drain live sessions for up to ``grace`` s, then end the
        proxy's thread or process.  A second call does nothing, and so does a
        call in a forked child (the proxy belongs to the process that started it)."""
        if os.getpid() != self._owner:
            return
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        atexit.unregister(self._at_exit)
        self._shutdown(grace)

    def hand_over(self, path, grace=5.0):
        """Live upgrade of the host program: give every listener and live session
        to the gproxy started with ``take_over=path`` (in the host's new process),
        then stop as ``stop(grace)`` does with what could not move (TLS sessions
        end cleanly).  Returns how many sessions moved; raises ``HandoverError``
        (everything still here, still served) if the other side is not there or
        fails before the commit."""
        self._check_owner()
        with self._stop_lock:
            if self._stopped:
                raise ProxyStopped("this gproxy was stopped")
        moved = self._hand_over(path)
        self.stop(grace)
        return moved

    def upgrade(self, timeout=60.0, grace=5.0):
        """Replace the proxy's process by one running the gproxy on disk now,
        handing it every listener and session (process mode only)."""
        raise NotImplementedError(
            "mode=%r runs gproxy's code in this process: it is upgraded with the host "
            "program (hand_over / start(take_over=...)); mode='process' upgrades its "
            "child with proxy.upgrade()" % (self.mode,))

    def _at_exit(self):
        """The host exits without having called ``stop``: drain as ``stop()`` does."""
        self.stop()

    def _check_owner(self):
        if os.getpid() != self._owner:
            raise ProxyStopped("this gproxy runs for process %d; a forked child cannot use "
                               "its handle (call the Admin API over HTTP instead)" % self._owner)

    def _forked(self):
        """In a forked child, right after the fork: let go of what the child inherited
        (nothing once stopped: the numbers may name the host's own files by now)."""
        if not self._stopped:
            self._release_in_child()

    def __repr__(self):
        return "<gproxy %s mode%s %s%s>" % (
            self.mode, " pid %s" % self.pid if getattr(self, "pid", None) else "",
            ", ".join("%s:%d" % a for a in self.addresses), " stopped" if self._stopped else "")

    def reopen_logs(self):
        """Reopen the stream access log (after logrotate renamed it), like SIGUSR1."""
        self._check_owner()
        self._reopen_logs()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    # -- the Admin API -----------------------------------------------------
    def admin(self, method, path, body=None, query=None):
        """One Admin API request (``path`` from ``/apisix/admin``); the JSON answer."""
        self._check_owner()
        data = body if body is None or isinstance(body, (str, bytes)) else json.dumps(body)
        if isinstance(data, bytes):
            data = data.decode("utf-8")
        status, text = self._request(method, path, data, query)
        try:
            answer = json.loads(text) if text.strip() else {}
        except ValueError:
            answer = {"error_msg": text.strip()}  # APISIX's plain-text page_size answer
        if status >= 400:
            raise AdminError(status, answer)
        return answer

    def sessions(self):
        """Live sessions, as ``GET /apisix/admin/gproxy/sessions`` returns them."""
        return self.admin("GET", ADMIN + "/gproxy/sessions")

    def stats(self):
        """Totals, as ``GET /apisix/admin/gproxy/stats`` returns them."""
        return self.admin("GET", ADMIN + "/gproxy/stats")

    # -- what a mode supplies ----------------------------------------------
    def _launch(self):
        raise NotImplementedError

    def _request(self, method, path, data, query):
        """``(status, text)`` of one Admin API request."""
        raise NotImplementedError

    def _shutdown(self, grace):
        raise NotImplementedError

    def _reopen_logs(self):
        raise NotImplementedError

    def _hand_over(self, path):
        """Everything to the gproxy waiting at ``path``; how many sessions moved."""
        raise NotImplementedError

    def _release_in_child(self):
        raise NotImplementedError
