"""The HTTP listeners beside the data path: Admin API, control API, metrics.

Each is a WSGI app served by ``AdminServer`` (pywsgi, at most
``gproxy.admin.max_connections`` connections, with ``gproxy.admin.timeout``
for idle ones and ``gproxy.admin.request_timeout`` for slow ones) on the
proxy's hub; the three share one ``CloseTally``, so connections they close
make one log line a second at most.  The control API (``apisix.enable_control``, ``apisix.control``)
and the metrics (``plugin_attr.prometheus``) read the runtime's ``stats()``
and ``health_report()``; with ``--workers`` they run in the parent and see
every worker.  A control or metrics address that cannot be bound is logged
and skipped: the proxy itself still starts.
"""

import logging

from gproxy import __version__
from gproxy.admin.extensions import health_blueprint as _health_blueprint
from gproxy.admin.server import AdminServer
from gproxy.control.api import create_control_app
from gproxy.control.metrics import PATH, GproxyCollector, HttpCollector, create_metrics_app
from gproxy.proxy.accept.listener import addr_text
from gproxy.proxy.sessions.registry import DIAL_BUCKETS

log = logging.getLogger("gproxy.server")
ADMIN_PREFIX = "/apisix/admin"


def health_blueprint(health):
    return _health_blueprint(ADMIN_PREFIX, health)


def serve_http(cfg, address, app, name, tally, start=True, inherited=None, **ssl_args):
    """An ``AdminServer`` named ``name`` for ``app`` on ``address`` (started unless
    ``start`` is False); on the socket a live upgrade handed over for that address,
    if there is one."""
    sock = (inherited or {}).pop(("http", addr_text(*address)), None)
    server = AdminServer(sock or address, app, cfg["gproxy.admin.max_connections"],
                         cfg["gproxy.admin.timeout"], cfg["gproxy.admin.request_timeout"],
                         name=name, tally=tally, log=None,
                         error_log=logging.getLogger("gproxy." + name), **ssl_args)
    if start:
        server.start()
    return server


def configure_http(cfg, servers):
    """Apply ``gproxy.admin.*`` (cap and timeouts) to running HTTP listeners (SIGHUP)."""
    for server in servers:
        server.configure(cfg["gproxy.admin.max_connections"], cfg["gproxy.admin.timeout"],
                         cfg["gproxy.admin.request_timeout"])


def _optional(gp, address, app, name, what, url):
    try:
        server = serve_http(gp.cfg, address, app, name, gp.http_tally,
                            inherited=gp.inherited)
    except OSError as exc:
        log.error("%s: cannot listen on %s:%d: %s; not served", what, address[0], address[1],
                  exc.strerror)
        return None
    log.warning("%s listening on http://%s:%d%s", what, address[0], address[1], url)
    return server


def metrics_app(gp):
    from prometheus_client import ProcessCollector
    collector = GproxyCollector(gp.stats, gp.health_report, __version__, DIAL_BUCKETS)
    http = HttpCollector(lambda: dict(gp.http_tally.totals), lambda: {
        server.name: server.conns.snapshot()[0]
        for server in [gp.admin_server] + gp.http_servers if server is not None})
    return create_metrics_app(collector, [http, ProcessCollector(registry=None)])


NO_ETCD = ("fleet=true needs the etcd store (deployment.role_traditional.config_provider: "
           "etcd): this answer covers this instance only")
FLEET_OFF = "gproxy.fleet.enable is false: this answer covers this instance only"


def fleet_for(gp):
    """The fleet this instance takes part in: on etcd, unless turned off."""
    from gproxy.fleet import Fleet, SoloFleet
    if not hasattr(gp.store, "watch_keys"):
        return SoloFleet(gp.live, NO_ETCD)
    if not gp.cfg["gproxy.fleet.enable"]:
        return SoloFleet(gp.live, FLEET_OFF)
    return Fleet(gp.store, gp.cfg, gp.live)


def start_http(gp):
    """Start the control API and metrics listeners the config asks for."""
    cfg = gp.cfg
    servers = []
    if cfg["apisix.enable_control"]:
        address = (cfg["apisix.control.ip"], cfg["apisix.control.port"])
        servers.append(_optional(gp, address, create_control_app(gp.health_report),
                                 "control", "control API", "/v1/healthcheck"))
    if cfg["plugin_attr.prometheus.enable_export_server"]:
        address = (cfg["plugin_attr.prometheus.export_addr.ip"],
                   cfg["plugin_attr.prometheus.export_addr.port"])
        servers.append(_optional(gp, address, metrics_app(gp), "metrics", "prometheus metrics",
                                 PATH))
    return [server for server in servers if server is not None]
