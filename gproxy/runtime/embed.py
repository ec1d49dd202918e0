"""Embedding: ``gproxy.start(config)`` in a synchronous, never monkey-patched program.

``start`` builds a ``Gproxy`` on its own gevent hub in one background thread
(``hubthread``) and returns an ``EmbeddedProxy`` handle once every listener
is bound, or raises what went wrong (a bad config, a port in use, an
unreachable store).  Every method of the handle is safe from any thread: it
runs on the hub thread and the caller waits for the answer.

Routes and upstreams go through the Admin API's own Flask app, called with
its test client on the hub thread (no socket, no key: the caller is the
process itself), so a body gets exactly the Admin API's checks, status codes
and error bodies; a non-2xx answer raises ``AdminError`` carrying APISIX's
``error_msg``.  ``stop(grace)`` drains as SIGTERM does and leaves no thread
and no descriptor behind.  A live upgrade of the host program moves the
proxy too: ``hand_over(path)`` in the old process, ``start(take_over=path)``
in the new one (the host decides when; gproxy cannot replace its process).
This module patches nothing and installs no signal handler.
"""

import copy
import ipaddress
import json
import os
import threading

from gproxy import config as config_mod
from gproxy.hub import monkey_patched
from gproxy.runtime.hubthread import HubThread

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


def start(config=None, workers=1, take_over=None, timeout=60.0):
    """Start gproxy in a background thread; returns once its listeners are bound.

    ``take_over``: a Unix socket path where this proxy waits (up to ``timeout``
    seconds) for another embedded gproxy's ``hand_over(path)``, usually in the
    host program's previous process, and takes its listeners and live sessions
    instead of binding; it returns once they are all here (docs/embedding.md)."""
    if workers != 1:
        raise ValueError("workers=%r: embedded gproxy runs in one process (forked workers "
                         "would copy the host program); run the gproxy command with "
                         "--workers for that" % (workers,))
    if monkey_patched():
        raise RuntimeError("gproxy.start() is for programs that are not monkey-patched; in a "
                           "gevent program run gproxy.runtime.app.Gproxy on your own hub")
    proxy = EmbeddedProxy(load_config(config))
    proxy._start(take_over, timeout)
    return proxy


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

    def __init__(self, cfg):
        self.cfg = cfg
        self.routes = Resource(self, "stream_routes")
        self.upstreams = Resource(self, "upstreams")
        self.addresses = []  # bound (host, port) of every stream listener
        self.admin_address = None  # (host, port) of the Admin API, when it is on
        self._hub = HubThread("gproxy-hub")
        self._app = None
        self._client = None
        self._stop_lock = threading.Lock()
        self._stopped = False

    # -- life cycle --------------------------------------------------------
    def _start(self, take_over=None, timeout=60.0):
        self._hub.start(lambda: self._setup(take_over, timeout))

    def _setup(self, take_over=None, timeout=60.0):
        """On the hub: build, bind, serve (Gproxy.start undoes itself on failure)."""
        from gproxy.runtime.app import Gproxy
        app = Gproxy(self.cfg)
        try:
            if take_over is None:
                app.start()
            else:
                from gproxy.runtime.transfer import take_over_at
                take_over_at(app, take_over, timeout)
        except BaseException:
            app.store.close()
            raise
        self._app = app
        self._client = _admin_client(app, self.cfg)
        self.addresses = list(app.addresses)
        if app.admin_server is not None:
            self.admin_address = (app.admin_server.server_host, app.admin_server.server_port)

    @property
    def port(self):
        """The first stream listener's port."""
        return self.addresses[0][1]

    def stop(self, grace=5.0):
        """Stop accepting, drain live sessions for up to ``grace`` s, end the thread."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        try:
            self._hub.call(self._shutdown, grace)
        finally:
            self._hub.finish()

    def hand_over(self, path, grace=5.0):
        """Live upgrade of the host program: give every listener and live session
        to the gproxy started with ``take_over=path`` (in the host's new process),
        then stop as ``stop(grace)`` does with what could not move (TLS sessions
        end cleanly).  Returns how many sessions moved; raises ``HandoverError``
        (everything still here, still served) if the other side is not there or
        fails before the commit."""
        with self._stop_lock:
            if self._stopped:
                raise RuntimeError("this gproxy was stopped")
        moved = self._hub.call(self._give, path)
        self.stop(grace)
        return moved

    def _give(self, path):
        from gproxy.runtime.transfer import give_all
        return give_all(self._app, path)

    def _shutdown(self, grace):
        try:
            self._app.stop(grace)
        finally:
            self._app.store.close()

    def reopen_logs(self):
        """Reopen the stream access log (after logrotate renamed it), like SIGUSR1."""
        self._hub.call(self._app.reopen_logs)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    # -- the Admin API -----------------------------------------------------
    def admin(self, method, path, body=None, query=None):
        """One Admin API request (``path`` from ``/apisix/admin``); the JSON answer."""
        data = body if body is None or isinstance(body, (str, bytes)) else json.dumps(body)
        status, text = self._hub.call(self._request, method, path, data, query)
        try:
            answer = json.loads(text) if text.strip() else {}
        except ValueError:
            answer = {"error_msg": text.strip()}  # APISIX's plain-text page_size answer
        if status >= 400:
            raise AdminError(status, answer)
        return answer

    def _request(self, method, path, data, query):
        resp = self._client.open(path, method=method, data=data, query_string=query,
                                 content_type="application/json")
        return resp.status_code, resp.get_data(as_text=True)

    def sessions(self):
        """Live sessions, as ``GET /apisix/admin/gproxy/sessions`` returns them."""
        return self.admin("GET", ADMIN + "/gproxy/sessions")

    def stats(self):
        """Totals, as ``GET /apisix/admin/gproxy/stats`` returns them."""
        return self.admin("GET", ADMIN + "/gproxy/stats")


def _admin_client(app, cfg):
    """The Admin API app for in-process calls: same checks, no key or address gate.

    The caller is the program gproxy runs in, so the token and allowlist that
    guard the HTTP listener do not apply; everything else is the same code.
    """
    from gproxy.admin.app import create_app
    local = copy.copy(cfg)
    local.values = dict(cfg.values)
    local.values["deployment.admin.admin_key_required"] = False
    local.values["deployment.admin.allow_admin"] = [ipaddress.ip_network("127.0.0.1/32")]
    return create_app(app.store, app.sessions, local).test_client()
