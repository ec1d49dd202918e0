"""The process: stream listeners, store, Admin API and workers, wired together.

``Gproxy`` is the only place the data path, the store and the Admin API meet.
It builds a ``RouteTable`` from the store (attaching the health checkers'
state to checked upstreams), serves every stream listener behind one accept
gate (``gproxy.max_connections``), runs the Admin API, the control API and
the metrics (``pywsgi``, capped) on the same hub, and polls the store for
outside edits.  A store change updates the table from what changed
(``tables``) and swaps one reference (with workers, it also sends the
changes to every worker and waits for their acks), so new connections see it
by the time the Admin API answers and live sessions keep the route they
matched.  ``stop(grace)`` drains (see
``drain``); ``reload_config(cfg)`` applies a new config file without
dropping a session.  It patches nothing and installs no signal handlers
(that is ``cli``'s job), so it can be embedded in a program that runs a
gevent hub.  ``standby``: a live upgrade's new process (``runtime.carry``),
which relays and accepts clients but leaves the store, the Admin API and
the fleet registration to the old process until ``go_live()``.
"""

import logging

import gevent
from gevent.lock import Semaphore

from gproxy.admin.tally import CloseTally
from gproxy.model.loadaware import Shared
from gproxy.proxy.accept.listener import Listener, bind_listener, listener_phases
from gproxy.proxy.accept.overload import Gate
from gproxy.proxy.accept.workers import SessionGreenlets
from gproxy.proxy.health import HealthCheckers
from gproxy.proxy.session.phases import COMMON
from gproxy.proxy.session.session import Proxy
from gproxy.proxy.sessions.live import LiveSessions
from gproxy.proxy.sessions.registry import Registry
from gproxy.proxy.settings import Settings
from gproxy.runtime import services
from gproxy.runtime.drain import drain
from gproxy.runtime.optional import access_log, discovery
from gproxy.runtime.tables import Tables, plain
from gproxy.store.base import KINDS
from gproxy.store.factory import open_store

log = logging.getLogger("gproxy.server")
DISCOVERY_PRIME = 3.0  # seconds start-up waits for the first DNS answers


class Gproxy:
    """Everything one gproxy process serves, built from a validated Config."""

    def __init__(self, cfg, store=None, registry=None, standby=False):
        self.cfg = cfg
        self.standby = standby  # until go_live(): a live upgrade's new process
        self.store = store if store is not None else open_store(cfg, standby)
        self.registry = registry if registry is not None else Registry()
        self.health = HealthCheckers()
        self.balancing = Shared()  # least_conn counts and ewma latencies outlive table swaps
        self.gate = Gate(cfg["gproxy.max_connections"],
                         reject=lambda reason: self.registry.reject(reason))
        self.tables = Tables(self)
        self.discovery = discovery(cfg, self.on_discovered)
        data = self.store.snapshot()
        if self.discovery is not None:  # the nodes service discovery found, filled in
            data = self.discovery.apply(data)
        table, certs = self.tables.build(data)
        self.proxy = Proxy(table, self.registry, Settings.from_config(cfg), certs=certs)
        self.proxy.access_log = access_log(cfg)
        self.sessions = LiveSessions(self.registry, lambda: self.proxy.table,
                                     **self.evict_options)
        self.store.subscribe(self.on_change)
        self.greenlets = SessionGreenlets()
        self.listeners = []
        self.admin_server = None
        self.http_servers = []  # the control API and metrics listeners
        self.http_tally = CloseTally(gevent.get_hub().loop)  # their closes, one line a second
        self.workers = None  # the parent's WorkerSet when running with --workers
        self.fleet = None  # gproxy.fleet's Fleet (etcd) or SoloFleet, built by start()
        self.worker_index = None  # set in a forked worker
        self._watcher = None
        self._stopping = False
        # Listening sockets handed over by a live upgrade, by ("stream" | "http",
        # addr text): used instead of binding (runtime.upgrade); what is left
        # after start-up (a listener the new config dropped) is closed.
        self.inherited = {}
        self.giver = None  # a worker's handover to its successor, until the commit
        self._changing = Semaphore()  # one group of changes at a time, workers included

    @property
    def evict_options(self):
        """How evictions end sessions (``gproxy.evict.*``)."""
        return {"grace": self.cfg["gproxy.evict.grace"],
                "server_reference": self.cfg["gproxy.evict.server_reference"]}

    @property
    def rebalance_options(self):
        """When ``--workers`` move sessions between them (``gproxy.workers.rebalance.*``)."""
        prefix = "gproxy.workers.rebalance."
        return {name: self.cfg[prefix + name]
                for name in ("interval", "ratio", "min_gap", "max_move")}

    def on_change(self, changes):
        """Store callback: make what changed live (in every worker too, in order)."""
        with self._changing:
            changes = plain(changes, self.store)
            if self.discovery is not None:  # dns upstreams get the nodes found for them
                changes = self.discovery.fill_changes(changes)
            self.tables.apply(changes)
            if self.workers is not None:
                self.workers.push_changes(changes)

    def on_discovered(self):
        """Discovery callback: a service's nodes changed; every upstream that names
        one is applied again like an Admin write (what did not change is kept)."""
        self.on_change([(kind, id_, self.store.get(kind, id_))
                        for kind, id_ in self.discovery.users()])

    def everything(self):
        """Every stored object as a change, in load order (a worker's whole table)."""
        items = [(kind, r.id, r.value) for kind in KINDS for r in self.store.list(kind)]
        return items if self.discovery is None else self.discovery.fill_changes(items)

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
        blueprints.append(services.health_blueprint(self.health_report))
        return create_app(self.store, self.live(), self.cfg, blueprints, self.fleet)

    def live(self):
        """The sessions view: this process's, or the workers' merged."""
        return self.workers if self.workers is not None else self.sessions

    # -- what the control API, metrics and dashboard read --------------------
    def stats(self):
        return (self.workers if self.workers is not None else self.registry).stats()

    def health_report(self):
        """Every health checker in APISIX's ``/v1/healthcheck`` shape (workers merged)."""
        if self.workers is not None:
            return self.workers.health()
        return self.health.report()

    # -- starting ------------------------------------------------------------
    def start(self, workers=1, handover=None):
        """Listen and serve (on the current hub); ``workers`` > 1 forks proxy processes
        (``handover``: a live upgrade's paths, where each waits for its old worker)."""
        if self.proxy.access_log is not None:
            self.proxy.access_log.check()  # a path it cannot open stops the start, as nginx
        if self.discovery is not None:  # the first answers before the first session
            self.discovery.prime(DISCOVERY_PRIME)
        if workers > 1:
            from gproxy.runtime.rebalance import Rebalancer
            from gproxy.runtime.workers import fork_workers
            self.workers = fork_workers(self, workers, handover)
            self.workers.rebalancer = Rebalancer(self.workers, self.workers.folder,
                                                 **self.rebalance_options)
        else:
            self._listen(reuseport=False)
            self.health.start()
        self.fleet = services.fleet_for(self)
        if self.cfg["apisix.enable_admin"]:
            self._start_admin()
        self.http_servers = services.start_http(self)
        if self.standby:  # the old process answers and stays registered until the commit
            self.fleet.standby()
            for server in self._http():
                server.stop_accepting()
        else:
            self.fleet.start()
        self._watcher = gevent.spawn(self._watch, self.cfg["gproxy.store.watch_interval"])
        if self.discovery is not None:  # the parent's (after any fork: workers get tables)
            self.discovery.start()
        self.close_inherited()

    def _http(self):
        return [server for server in [self.admin_server] + self.http_servers
                if server is not None]

    def go_live(self):
        """A live upgrade committed: the Admin API, control and metrics accept here."""
        self.standby = False
        for server in self._http():
            server.start_accepting()

    def close_inherited(self):
        for sock in self.inherited.values():
            sock.close()  # a listener the new config does not have any more
        self.inherited = {}

    def start_worker(self, index, handover=None):
        """In a forked worker: a fresh registry and this worker's own listeners
        (or, in a live upgrade, its old worker's, taken at ``handover``)."""
        self.registry = Registry()
        self.proxy.registry = self.sessions.registry = self.registry
        self.worker_index = index
        self.inherited = {}  # the parent's HTTP listeners are not ours
        if handover is not None:
            from gproxy.runtime.transfer import take_at
            take_at(self, handover)
            return
        self.start_listening()

    def start_listening(self):
        """A worker's own listeners (reuseport; handed ones first) and health checks."""
        self._listen(reuseport=True)
        self.close_inherited()
        self.health.start()
        log.info("worker %d serving", self.worker_index)

    def _listen(self, reuseport, specs=None):
        if specs is None and not self.cfg.stream_enabled:  # APISIX: no stream_proxy, or http
            log.warning("stream mode is disabled (no apisix.stream_proxy in the config, or "
                        "apisix.proxy_mode is http): no stream listener")
            return
        for spec in self.cfg["apisix.stream_proxy.tcp"] if specs is None else specs:
            try:
                sock = self.inherited.pop(("stream", spec.addr), None)
                if sock is None:
                    sock = bind_listener(spec.host, spec.port, reuseport=reuseport)
            except OSError as exc:
                if spec.optional:
                    log.info("listener %s skipped: %s", spec.addr, exc.strerror)
                    continue
                if specs is None:
                    self.stop(0)
                raise OSError(exc.errno, "cannot listen on %s: %s" % (spec.addr, exc.strerror))
            listener = Listener(sock, spec, self._phases(spec) + COMMON, gate=self.gate)
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
        from gproxy.admin.server import https_context
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
        self.admin_server = services.serve_http(self.cfg, (host, port), self.admin_app(),
                                                "admin", self.http_tally, start=False,
                                                inherited=self.inherited, **ssl_args)
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
                if self.workers is not None:
                    self.workers.reap()
                    with self._changing:
                        self.workers.converge()
            except Exception:  # never let one bad poll stop future ones
                log.exception("store: poll failed")

    @property
    def addresses(self):
        """The bound ``(host, port)`` of each listener (useful with port 0)."""
        return [listener.address for listener in self.listeners]

    # -- changing ------------------------------------------------------------
    def reopen_logs(self):
        """SIGUSR1: reopen the access log (in every worker), for logrotate."""
        if self.workers is not None:
            self.workers.reopen()
        elif self.proxy.access_log is not None:
            self.proxy.access_log.reopen()

    def reload_config(self, cfg, log_level=None):
        """Apply a new config (SIGHUP): listeners, log level, limits, timeouts.

        Live sessions are untouched: a removed listener only stops accepting,
        and new settings apply to sessions that start from now on.
        """
        from gproxy.runtime.reload import apply_config
        apply_config(self, cfg, log_level)

    # -- stopping ------------------------------------------------------------
    def stop(self, grace=None):
        """Stop accepting, end live sessions cleanly within ``grace`` seconds
        (default ``gproxy.shutdown.grace``; 0 closes them at once), then close
        what is left.  A second call (with 0) forces a drain in progress."""
        if grace is None:
            grace = self.cfg["gproxy.shutdown.grace"]
        for listener in self.listeners:
            listener.close()
        if self.fleet is not None and not self._stopping:
            self.fleet.stop()  # the fleet hears "draining" before the sessions end
        self.health.stop()
        if self.discovery is not None:
            self.discovery.stop()
        for server in [self.admin_server] + self.http_servers:
            if server is not None:
                server.close()
        if self._watcher is not None:
            self._watcher.kill(block=False)
        forcing, self._stopping = self._stopping, True
        if self.workers is not None:
            if forcing:
                self.workers.force()
            else:
                self.workers.stop(grace)
            self.workers = None
        drain(self.registry, grace, self.cfg["gproxy.shutdown.server_reference"])
        self.registry.close_where()
        self.proxy.relays.close_all()
        if self.proxy.access_log is not None:
            self.proxy.access_log.close()  # the lines of the sessions just ended
        self.greenlets.kill()
        for listener in self.listeners:
            listener.stop()
        self.gate.close()
        for server in [self.admin_server] + self.http_servers:
            if server is not None:
                server.stop(timeout=1)
        if self.fleet is not None:
            self.fleet.leave()
            self.fleet = None
        self.admin_server = None
        self.http_servers = []
        self.listeners = []

