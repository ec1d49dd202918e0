"""Reloading conf/config.yaml in place (SIGHUP): what changes and what waits.

Applied at once, without dropping a live session: stream listeners added
and removed (a removed one stops accepting; its sessions go on), the log
level, ``gproxy.max_connections``, and the data path's timeouts and buffer
size (for sessions that start from now on), the stream access log's
settings.  With ``--workers`` the parent
passes the new config to every worker.  Settings that would need new
processes or new HTTP listeners (admin, control and metrics addresses, the
store, the chash ring) keep their old value and are logged as needing a
restart.  The CLI has already checked the file: a bad one never gets here.
"""

import logging

from gproxy.config import PY_LEVELS
from gproxy.proxy.settings import Settings

log = logging.getLogger("gproxy.server")

#: Keys whose new value takes a restart (listed once, in the log).
RESTART = ("deployment.admin.admin_listen.ip", "deployment.admin.admin_listen.port",
           "deployment.admin.admin_key", "deployment.admin.allow_admin",
           "deployment.admin.admin_key_required", "apisix.enable_admin",
           "apisix.enable_control", "apisix.control.ip", "apisix.control.port",
           "plugin_attr.prometheus.enable_export_server",
           "plugin_attr.prometheus.export_addr.ip", "plugin_attr.prometheus.export_addr.port",
           "gproxy.store.backend", "gproxy.store.path", "gproxy.balancer.chash_ring",
           "gproxy.admin.max_connections", "gproxy.admin.timeout",
           "discovery.dns.servers", "discovery.dns.resolv_conf", "discovery.dns.order",
           "apisix.enable_ipv6",
           "gproxy.workers.rebalance.interval", "gproxy.workers.rebalance.ratio",
           "gproxy.workers.rebalance.min_gap", "gproxy.workers.rebalance.max_move",
           # the etcd connection, the keyring its keys were read with, the fleet
           "deployment.etcd.user", "deployment.etcd.password", "deployment.etcd.tls.verify",
           "deployment.etcd.tls.cert", "deployment.etcd.tls.key", "deployment.etcd.tls.sni",
           "apisix.data_encryption.keyring", "apisix.id", "plugin_attr.server-info.report_ttl",
           "gproxy.fleet.enable", "gproxy.fleet.admin_url", "gproxy.fleet.timeout")


def apply_config(gp, cfg, log_level=None):
    old = gp.cfg
    pending = [key for key in RESTART if old[key] != cfg[key]]
    for key in pending:
        cfg.values[key] = old[key]  # what runs is what the process reports
    if pending:
        log.warning("reload: %s changed; that takes a restart", ", ".join(pending))
    gp.cfg = cfg
    logging.getLogger().setLevel(PY_LEVELS[log_level or cfg["nginx_config.error_log_level"]])
    gp.proxy.settings = Settings.from_config(cfg)
    _access_log(gp, old, cfg)
    gp.gate.set_limit(cfg["gproxy.max_connections"])
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
