"""The parts of a process the config turns on: the stream access log, DNS discovery.

Each builder reads its settings (paths relative to the config file's
directory, as every path gproxy reads) and returns None when it is off.
"""

import os

from gproxy.proxy.accesslog import AccessLog


def access_log(cfg):
    """The stream access log the config asks for (None when it is off)."""
    if not cfg["nginx_config.stream.enable_access_log"]:
        return None
    stream = "nginx_config.stream."
    return AccessLog(os.path.join(cfg.base_dir, cfg[stream + "access_log"]),
                     cfg[stream + "access_log_format"], cfg[stream + "access_log_format_escape"])


def discovery(cfg, on_change):
    """DNS service discovery when ``discovery.dns`` is configured (else None)."""
    if not cfg.dns_discovery:
        return None
    from gproxy.discovery.dns import dns_discovery
    from gproxy.discovery.dnsclient import parse_server, servers_from_resolv_conf
    servers = cfg["discovery.dns.servers"]
    servers = ([parse_server(s) for s in servers] if servers
               else servers_from_resolv_conf(os.path.join(cfg.base_dir,
                                                          cfg["discovery.dns.resolv_conf"])))
    return dns_discovery(servers, on_change, cfg["discovery.dns.order"],
                         cfg["apisix.enable_ipv6"])
