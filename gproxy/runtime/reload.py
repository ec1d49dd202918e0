"""Reloading conf/config.yaml in place (SIGHUP): what changes and what waits.

Applied at once, without dropping a live session (``LIVE``): stream
listeners added and removed (a removed one stops accepting; its sessions go
on), the log level, ``gproxy.max_connections``, the data path's timeouts and
buffer size (for sessions that start from now on), the stream access log's
settings, the HTTP listeners' cap and timeouts, the eviction and shutdown
settings.  With ``--workers`` the parent passes the new config to every
worker.  Every other key needs new processes, listeners or a new store (the
admin, control and metrics addresses and keys, the store and its etcd, the
chash ring, DNS discovery, a listener's TLS and PROXY protocol defaults,
...): it keeps its old value and is logged as needing a restart.  The list
is of what *is* applied, so a key added later is reported as needing a
restart until it is made live here.  The CLI has already checked the file:
a bad one never gets here.
"""

import logging

from gproxy.config import PY_LEVELS
from gproxy.proxy.settings import Settings
from gproxy.runtime.services import configure_http

log = logging.getLogger("gproxy.server")

#: Keys whose new value applies without a restart (see ``apply_config``).
LIVE = frozenset((
    "apisix.stream_proxy.tcp", "nginx_config.error_log_level",
    # Settings: read by each session as it starts
    "gproxy.preread.timeout", "gproxy.preread.buffer_size", "gproxy.proxy.connect_timeout",
    "gproxy.proxy.timeout", "gproxy.max_connections", "gproxy.tls.handshake_timeout",
    "apisix.ssl.fallback_sni",
    # the stream access log, reopened with its new settings (_access_log)
    "nginx_config.stream.enable_access_log", "nginx_config.stream.access_log",
    "nginx_config.stream.access_log_format", "nginx_config.stream.access_log_format_escape",
    # read when they are used
    "gproxy.shutdown.grace", "gproxy.shutdown.server_reference",
    "gproxy.evict.grace", "gproxy.evict.server_reference",
    "gproxy.admin.max_connections", "gproxy.admin.timeout", "gproxy.admin.request_timeout",
    "gproxy.upgrade.command", "gproxy.upgrade.timeout",
))


def needs_restart(old, new):
    """The keys whose value differs between configs ``old`` and ``new`` and that
    are not applied live, in declaration order."""
    return [key for key in old.values if key not in LIVE and old[key] != new[key]]


def apply_config(gp, cfg, log_level=None):
    old = gp.cfg
    pending = needs_restart(old, cfg)
    for key in pending:
        cfg.values[key] = old[key]  # what runs is what the process reports
    if pending:
        log.warning("reload: %s changed; that takes a restart", ", ".join(pending))
    gp.cfg = cfg
    logging.getLogger().setLevel(PY_LEVELS[log_level or cfg["nginx_config.error_log_level"]])
    gp.proxy.settings = Settings.from_config(cfg)
    _access_log(gp, old, cfg)
    gp.gate.set_limit(cfg["gproxy.max_connections"])
    evictions = gp.workers if gp.workers is not None else gp.sessions
    evictions.grace = cfg["gproxy.evict.grace"]
    evictions.server_reference = cfg["gproxy.evict.server_reference"]
    configure_http(cfg, [s for s in [gp.admin_server] + gp.http_servers if s is not None])
    if gp.workers is not None:
        gp.workers.reload(cfg, log_level)
    else:
        _listeners(gp, cfg["apisix.stream_proxy.tcp"], reuseport=gp.worker_index is not None)
    log.warning("reload: configuration from %s applied", cfg.path or "(defaults)")


def _access_log(gp, old, cfg):
    """A changed stream access log setting takes effect for sessions that end from now on."""
    keys = [k for k in cfg.values if k.startswith("nginx_config.stream.")]
    if all(old[k] == cfg[k] for k in keys):
        return
    from gproxy.runtime.optional import access_log
    previous, gp.proxy.access_log = gp.proxy.access_log, access_log(cfg)
    if previous is not None:
        previous.close()


def _listeners(gp, specs, reuseport):
    current = {listener.spec: listener for listener in gp.listeners}
    for spec, listener in current.items():
        if spec not in specs:
            listener.close()  # its sessions go on; no new ones
            gp.listeners.remove(listener)
            log.warning("stream proxy no longer listening on %s", spec.addr)
    for spec in specs:
        if spec not in current:
            try:
                gp._listen(reuseport, [spec])
            except OSError as exc:
                log.error("reload: %s", exc.strerror or exc)
