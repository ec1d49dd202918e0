"""The process: stream listeners, store, Admin API and workers, wired together.

``Gproxy`` is the only place the data path, the store and the Admin API meet.
It builds a ``RouteTable`` from the store, serves every stream listener into
one bounded pool of session greenlets, runs the Admin API (``pywsgi``) on the
same hub, and polls the store for outside edits.  A store change builds a new
table and swaps one reference (or, with workers, pushes the data to every
worker and waits for their acks), so new connections see it by the time the
Admin API answers and live sessions keep the route they matched.  It patches
nothing and installs no signal handlers (that is ``cli``'s job), so it can be
embedded in a program that runs a gevent hub.
"""

import logging
import time

import gevent

from gproxy.model.routes import RouteTable
from gproxy.proxy.listener import Listener, bind_listener, listener_phases
from gproxy.proxy.livesessions import LiveSessions
from gproxy.proxy.registry import Registry
from gproxy.proxy.session import Proxy
from gproxy.proxy.settings import Settings
from gproxy.proxy.tlsctx import Certificates
from gproxy.proxy.workers import SessionGreenlets
from gproxy.store.factory import open_store

log = logging.getLogger("gproxy.server")


class Gproxy:
    """Everything one gproxy process serves, built from a validated Config."""

    def __init__(self, cfg, store=None, registry=None):
        self.cfg = cfg
        self.store = store if store is not None else open_store(cfg)
        self.registry = registry if registry is not None else Registry()
        data = self.store.snapshot()
        self.proxy = Proxy(self.build_table(data), self.registry, Settings.from_config(cfg),
                           certs=self.build_certs(data))
        self.sessions = LiveSessions(self.registry, lambda: self.proxy.table,
                                     **self.evict_options)
        self.store.subscribe(self.reload)
        self.greenlets = SessionGreenlets()
        self.listeners = []
        self.admin_server = None
        self.workers = None  # the parent's WorkerSet when running with --workers
        self._watcher = None

    @property
    def evict_options(self):
        """How evictions end sessions (``gproxy.evict.*``)."""
        return {"grace": self.cfg["gproxy.evict.grace"],
                "server_reference": self.cfg["gproxy.evict.server_reference"]}

    def build_table(self, data):
        return RouteTable(data["stream_routes"], data["upstreams"],
                          self.cfg["gproxy.balancer.chash_ring"])

    def build_certs(self, data, previous=None):
        """The ``ssls`` snapshot TLS listeners and ``scheme: tls`` upstreams use."""
        return Certificates(data.get("ssls") or (),
                            self.cfg["apisix.ssl.ssl_trusted_certificate"], previous)

    def set_data(self, data):
        """Swap in a route table built from ``{stream_routes, upstreams, ssls}``."""
        self.proxy.table = self.build_table(data)
        self.proxy.certs = self.build_certs(data, self.proxy.certs)
        log.info("route table rebuilt: routes=%d upstreams=%d",
                 len(self.proxy.table.routes), len(self.proxy.table.upstreams))

    def reload(self):
        """Store callback: make the store's current data live (in every worker)."""
        data = self.store.snapshot()
        if self.workers is not None:
            self.workers.push_table(data)
        else:
            self.set_data(data)

    def admin_app(self):
        """The Admin API (and the dashboard, when admin_ui is installed) as a WSGI app."""
        from gproxy.admin.app import create_app
        blueprints = []
        try:
            from admin_ui import create_blueprint
        except ImportError:
            log.info("admin_ui not installed: serving the Admin API without the dashboard")
        else:
            blueprints.append(create_blueprint())
        sessions = self.workers if self.workers is not None else self.sessions
        return create_app(self.store, sessions, self.cfg, blueprints)

    def start(self, workers=1):
        """Listen and serve (on the current hub); ``workers`` > 1 forks proxy processes."""
        if workers > 1:
            from gproxy.runtime.workers import fork_workers
            self.workers = fork_workers(self, workers)
        else:
            self._listen(reuseport=False)
        if self.cfg["apisix.enable_admin"]:
            self._start_admin()
        self._watcher = gevent.spawn(self._watch, self.cfg["gproxy.store.watch_interval"])

    def start_worker(self, index):
        """In a forked worker: a fresh registry and this worker's own listeners."""
        self.registry = Registry()
        self.proxy.registry = self.sessions.registry = self.registry
        self._listen(reuseport=True)
        log.info("worker %d serving", index)

    def _listen(self, reuseport):
        if not self.cfg.stream_enabled:  # APISIX: no stream_proxy, or proxy_mode http
            log.warning("stream mode is disabled (no apisix.stream_proxy in the config, or "
                        "apisix.proxy_mode is http): no stream listener")
            return
        for spec in self.cfg["apisix.stream_proxy.tcp"]:
            try:
                sock = bind_listener(spec.host, spec.port, reuseport=reuseport)
            except OSError as exc:
                if spec.optional:
                    log.info("listener %s skipped: %s", spec.addr, exc.strerror)
                    continue
                self.stop(0)
                raise OSError(exc.errno, "cannot listen on %s: %s" % (spec.addr, exc.strerror))
            listener = Listener(sock, spec, self._phases(spec))
            listener.serve(self.proxy.handle, self.greenlets.spawn)
            self.listeners.append(listener)
            log.warning("stream proxy listening on %s", spec.addr)

    def _phases(self, spec):
        """A listener's own phases from its config entry (APISIX's object form)."""
        cfg = self.cfg
        pp_in, pp_out = spec.proxy_protocol, spec.proxy_protocol_to_upstream
        return listener_phases(
            spec.tls,
            cfg["apisix.proxy_protocol.enable_tcp_pp"] if pp_in is None else pp_in,
            cfg["apisix.proxy_protocol.enable_tcp_pp_to_upstream"] if pp_out is None else pp_out,
            cfg["gproxy.proxy_protocol.upstream_version"])

    def _start_admin(self):
        from gproxy.admin.server import AdminServer, https_context
        host = self.cfg["deployment.admin.admin_listen.ip"]
        port = self.cfg["deployment.admin.admin_listen.port"]
        ssl_args, scheme = {}, "http"
        if self.cfg["deployment.admin.https_admin"]:
            mtls = "deployment.admin.admin_api_mtls."
            ssl_args["ssl_context"] = https_context(
                self.cfg.admin_file(mtls + "admin_ssl_cert"),
                self.cfg.admin_file(mtls + "admin_ssl_cert_key"),
                self.cfg.admin_file(mtls + "admin_ssl_ca_cert"))
            scheme = "https"
        self.admin_server = AdminServer((host, port), self.admin_app(), log=None,
                                        error_log=logging.getLogger("gproxy.admin"), **ssl_args)
        try:
            self.admin_server.start()
        except OSError as exc:
            self.stop(0)
            raise OSError(exc.errno, "cannot listen on %s:%d for the Admin API: %s"
                          % (host, port, exc.strerror))
        log.warning("admin API listening on %s://%s:%d/apisix/admin", scheme, host, port)

    def _watch(self, interval):
        while True:
            gevent.sleep(interval)
            try:
                self.store.poll()
            except Exception:  # never let one bad poll stop future ones
                log.exception("store: poll failed")

    @property
    def addresses(self):
        """The bound ``(host, port)`` of each listener (useful with port 0)."""
        return [listener.address for listener in self.listeners]

    def stop(self, timeout=10.0):
        """Stop accepting, give live sessions ``timeout`` seconds, then close them."""
        for listener in self.listeners:
            listener.close()
        if self.admin_server is not None:
            self.admin_server.close()
        if self._watcher is not None:
            self._watcher.kill(block=False)
        if self.workers is not None:
            self.workers.stop(timeout)
            self.workers = None
        if timeout and len(self.registry):
            log.warning("draining %d sessions for up to %.0fs", len(self.registry), timeout)
            deadline = time.monotonic() + timeout
            while len(self.registry) and time.monotonic() < deadline:
                gevent.sleep(0.1)
        self.registry.close_where()
        self.proxy.relays.close_all()
        self.greenlets.kill()
        for listener in self.listeners:
            listener.stop()
        if self.admin_server is not None:
            self.admin_server.stop(timeout=1)
            self.admin_server = None
        self.listeners = []
