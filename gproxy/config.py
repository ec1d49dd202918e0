"""conf/config.yaml: APISIX-shaped settings, each declared once with default and help.

Reads the YAML (with APISIX's ``${{VAR}}`` / ``${{VAR:=default}}`` substitution),
checks every known key, warns about unknown ones, and raises ConfigError naming
the key for a wrong type or value (the CLI turns that into exit status 2).
Owns no sockets and starts nothing.
"""

import ipaddress
import logging
import os
import re
from dataclasses import dataclass

import yaml

from gproxy.errors import ConfigError

log = logging.getLogger("gproxy.config")

DEFAULT_ADMIN_KEY = "edd1c9f034335f136f87ad84b625c8f1"
LOG_LEVELS = ("debug", "info", "notice", "warn", "error", "crit", "alert", "emerg")
#: nginx level names -> logging levels
PY_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "notice": logging.INFO,
             "warn": logging.WARNING, "error": logging.ERROR, "crit": logging.CRITICAL,
             "alert": logging.CRITICAL, "emerg": logging.CRITICAL}


@dataclass(frozen=True)
class ListenerSpec:
    """One ``apisix.stream_proxy.tcp`` entry, expanded to a single bind address."""

    host: str
    port: int
    tls: bool = False
    proxy_protocol: bool = None  # None: apisix.proxy_protocol.enable_tcp_pp decides
    optional: bool = False  # the IPv6 twin of a bare port: skipped if IPv6 is off
    proxy_protocol_to_upstream: bool = None  # None: ...enable_tcp_pp_to_upstream decides

    @property
    def addr(self):
        return "[%s]:%d" % (self.host, self.port) if ":" in self.host else "%s:%d" % (
            self.host, self.port)


def _port(value, key):
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ConfigError("%s: expected a port 1-65535, got %r" % (key, value))
    return value


def _ports(text, key):
    lo, sep, hi = str(text).partition("-")
    if not (lo.isdigit() and (not sep or hi.isdigit())):
        raise ConfigError("%s: expected a port or port range, got %r" % (key, text))
    lo, hi = int(lo), int(hi or lo)
    if not (1 <= lo <= hi <= 65535) or hi - lo >= 1024:
        raise ConfigError("%s: bad port range %r" % (key, text))
    return range(lo, hi + 1)


_LISTENER_FLAGS = ("tls", "proxy_protocol", "proxy_protocol_to_upstream")


def _listener_entry(item, key):
    flags = {}
    if isinstance(item, dict):  # APISIX's object form (§7)
        unknown = set(item) - {"addr"} - set(_LISTENER_FLAGS)
        if unknown or "addr" not in item:
            raise ConfigError("%s: expected {addr, tls, proxy_protocol, "
                              "proxy_protocol_to_upstream}, got %r" % (key, item))
        for flag in _LISTENER_FLAGS:
            if item.get(flag) is not None:
                flags[flag] = _bool(item[flag], "%s.%s" % (key, flag))
        item = item["addr"]
    if isinstance(item, int) and not isinstance(item, bool):
        port = _port(item, key)  # all addresses, IPv4 and (where available) IPv6
        return [ListenerSpec("0.0.0.0", port, **flags),
                ListenerSpec("::", port, optional=True, **flags)]
    elif isinstance(item, str):
        host, sep, ports_text = item.rpartition(":")
        if not sep:  # "9100" or "2000-2100"
            host, ports_text = "0.0.0.0", item
        host = host.strip("[]")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError("%s: %r is not an IP address" % (key, host)) from None
        hosts, ports = (host,), _ports(ports_text, key)
    else:
        raise ConfigError("%s: expected a port, \"ip:port\" or {addr: ...}, got %r" % (key, item))
    return [ListenerSpec(h, p, **flags) for h in hosts for p in ports]


def listeners(value, key):
    if not isinstance(value, list) or not value:
        raise ConfigError("%s: expected a non-empty list" % key)
    out = []
    for i, item in enumerate(value):
        out.extend(_listener_entry(item, "%s[%d]" % (key, i)))
    if len(set(out)) != len(out):
        raise ConfigError("%s: duplicate listener" % key)
    return out


def _typed(kind, check=None, what=None):
    def validate(value, key):
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        if not ok or (check and not check(value)):
            raise ConfigError("%s: expected %s, got %r" % (key, what or kind.__name__, value))
        return value
    return validate


def _choice(*allowed):
    return _typed(str, lambda v: v in allowed, "one of " + ", ".join(allowed))


def _cidrs(value, key):
    if not isinstance(value, list):
        raise ConfigError("%s: expected a list of CIDRs" % key)
    try:
        return [ipaddress.ip_network(v, strict=False) for v in value]
    except (ValueError, TypeError) as exc:
        raise ConfigError("%s: %s" % (key, exc)) from None


def _admin_keys(value, key):
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError("%s: expected a list of {name, key, role}" % key)
    for i, item in enumerate(value):
        if (not isinstance(item, dict) or not isinstance(item.get("key"), str)
                or item.get("role", "admin") not in ("admin", "viewer")):
            raise ConfigError("%s[%d]: expected {name, key: <string>, role: admin|viewer}"
                              % (key, i))
    return value


def _optional_text(value, key):
    if value is not None and (not isinstance(value, str) or not value):
        raise ConfigError("%s: expected a non-empty string or null, got %r" % (key, value))
    return value


def _etcd_hosts(value, key):
    if isinstance(value, str):
        value = [value]
    if (not isinstance(value, list) or not value or not all(
            isinstance(v, str) and re.match(r"^https?://[^/]+$", v.rstrip("/")) for v in value)):
        raise ConfigError("%s: expected a list of http(s)://host:port URLs, got %r" % (key, value))
    return [v.rstrip("/") for v in value]


_number = _typed((int, float), lambda v: v > 0, "a number > 0")
_count = _typed(int, lambda v: v > 0, "an integer > 0")
_bool = _typed(bool)


def _optional_str(value, key):
    if value is not None and not isinstance(value, str):
        raise ConfigError("%s: expected a string, got %r" % (key, value))
    return value or None

#: (key, default, validator, help). The one place each setting is declared.
SETTINGS = [
    ("apisix.stream_proxy.tcp", [9100], listeners,
     "stream listeners: port, \"ip:port\", \"ip:lo-hi\" or {addr, tls, proxy_protocol, "
     "proxy_protocol_to_upstream}"),
    # -- TLS and the PROXY protocol (docs/tls.md) --
    ("apisix.proxy_protocol.enable_tcp_pp", False, _bool,
     "listeners without their own proxy_protocol read a PROXY header"),
    ("apisix.proxy_protocol.enable_tcp_pp_to_upstream", False, _bool,
     "listeners without their own proxy_protocol_to_upstream send one to nodes"),
    ("gproxy.proxy_protocol.upstream_version", 1, _typed(int, lambda v: v in (1, 2), "1 or 2"),
     "PROXY protocol version sent to nodes (nginx sends 1)"),
    ("apisix.ssl.fallback_sni", None, _optional_str,
     "server name assumed when a TLS client sends none"),
    ("apisix.ssl.ssl_trusted_certificate", "system", _typed(str),
     "CA bundle (path, or 'system') for scheme: tls upstreams with tls.verify"),
    ("gproxy.tls.handshake_timeout", 60.0, _number,
     "seconds a TLS client has to finish its handshake (nginx ssl_handshake_timeout)"),
    ("deployment.admin.https_admin", False, _bool, "serve the Admin API over HTTPS"),
    ("deployment.admin.admin_api_mtls.admin_ssl_cert", "", _typed(str),
     "Admin API certificate file (PEM)"),
    ("deployment.admin.admin_api_mtls.admin_ssl_cert_key", "", _typed(str),
     "Admin API private key file (PEM)"),
    ("deployment.admin.admin_api_mtls.admin_ssl_ca_cert", "", _typed(str),
     "CA file: when set, Admin API clients must present a certificate it signed"),
    ("apisix.stream_proxy.only", True, _bool, "accepted for APISIX compatibility"),
    ("apisix.proxy_mode", "http&stream", _choice("http", "stream", "http&stream"),
     "http turns the stream proxy off, as in APISIX 3.5+; stream or http&stream keep it"),
    ("apisix.enable_admin", True, _bool, "serve the Admin API and dashboard"),
    ("deployment.admin.admin_listen.ip", "127.0.0.1", _typed(str), "Admin API address"),
    ("deployment.admin.admin_listen.port", 9080, _port, "Admin API port"),
    ("deployment.admin.admin_key_required", True, _bool, "check X-API-KEY"),
    ("deployment.admin.admin_key",
     [{"name": "admin", "key": DEFAULT_ADMIN_KEY, "role": "admin"}], _admin_keys,
     "Admin API keys: [{name, key, role: admin|viewer}]"),
    ("deployment.admin.allow_admin", ["127.0.0.0/24", "::1/128"], _cidrs,
     "client CIDRs allowed to reach the Admin API"),
    ("deployment.admin.enable_admin_cors", True, _bool, "send CORS headers"),
    ("nginx_config.error_log_level", "warn", _choice(*LOG_LEVELS), "log level"),
    ("gproxy.store.backend", "file", _choice("file"), "where routes live"),
    ("deployment.role", "traditional", _choice("traditional", "data_plane"),
     "APISIX's role; its config_provider picks the store"),
    ("deployment.role_traditional.config_provider", "yaml", _choice("yaml", "etcd"),
     "yaml: the store file (gproxy.store.path); etcd: shared routes on deployment.etcd"),
    ("deployment.role_data_plane.config_provider", "yaml", _choice("yaml", "etcd"),
     "as role_traditional.config_provider, for APISIX data-plane configs"),
    ("deployment.etcd.host", ["http://127.0.0.1:2379"], _etcd_hosts, "etcd endpoints"),
    ("deployment.etcd.prefix", "/apisix", _typed(str, lambda v: v.startswith("/"),
                                                 "a key prefix starting with /"),
     "etcd key prefix: <prefix>/stream_routes/<id>, <prefix>/upstreams/<id>"),
    ("deployment.etcd.timeout", 30, _number, "seconds an etcd request may take"),
    ("deployment.etcd.watch_timeout", 50, _number,
     "seconds an idle watch waits before it is re-opened from its revision"),
    ("deployment.etcd.health_check_timeout", 10, _number,
     "seconds an etcd endpoint that failed 3 times is skipped"),
    ("gproxy.store.path", "apisix.yaml", _typed(str),
     "store file, relative to the config file's directory"),
    ("gproxy.store.watch_interval", 1.0, _number, "seconds between checks for hand edits"),
    ("gproxy.preread.timeout", 30.0, _number,
     "seconds a client has to send its whole CONNECT (nginx preread_timeout)"),
    ("gproxy.preread.buffer_size", 16384, _typed(int, lambda v: v >= 16, "an integer >= 16"),
     "largest CONNECT accepted, bytes (nginx preread_buffer_size)"),
    ("gproxy.proxy.connect_timeout", 60.0, _number,
     "upstream connect timeout when the upstream sets none, seconds"),
    ("gproxy.proxy.timeout", 600.0, _number,
     "close a session idle this long in both directions, seconds (nginx proxy_timeout)"),
    ("gproxy.max_connections", 10000, _count, "concurrent sessions per process"),
    ("gproxy.balancer.chash_ring", "apisix", _choice("apisix", "ketama"),
     "chash ring: APISIX-exact CRC32 ring, or uhashring's ketama"),
    ("gproxy.shutdown.grace", 5.0, _typed((int, float), lambda v: v >= 0, "a number >= 0"),
     "seconds SIGTERM gives live sessions to end cleanly (DISCONNECT at a packet boundary)"),
    ("gproxy.shutdown.server_reference", None, _optional_text,
     "a peer gproxy (host:port) for MQTT 5 clients: set, shutdown sends 0x9C Use another "
     "server with this Server Reference instead of 0x8B Server shutting down"),
    ("apisix.enable_control", True, _bool, "serve the control API (GET /v1/healthcheck)"),
    ("apisix.control.ip", "127.0.0.1", _typed(str), "control API address"),
    ("apisix.control.port", 9090, _port, "control API port"),
    ("plugin_attr.prometheus.enable_export_server", True, _bool,
     "serve Prometheus metrics at /apisix/prometheus/metrics"),
    ("plugin_attr.prometheus.export_addr.ip", "127.0.0.1", _typed(str), "metrics address"),
    ("plugin_attr.prometheus.export_addr.port", 9091, _port, "metrics port"),
    ("gproxy.admin.max_connections", 64, _count,
     "concurrent connections to each HTTP listener (admin, control, metrics); more wait "
     "in the backlog, so they never take the file descriptors sessions need"),
    ("gproxy.admin.timeout", 30.0, _number,
     "seconds an HTTP client has to send a request's headers, and may stay idle between "
     "requests, on the admin, control and metrics listeners"),
    ("gproxy.evict.server_reference", None, _optional_text,
     "Server Reference sent to MQTT 5 clients in the DISCONNECT (0x9C) of an eviction"),
    ("gproxy.evict.grace", 5.0, _number,
     "seconds an evicted session has to reach a packet boundary before it is cut"),
]
_DECLARED = {key for key, *_ in SETTINGS}
_PARENTS = {key.rsplit(".", i)[0] for key in _DECLARED for i in range(1, key.count(".") + 1)}
#: APISIX keys a pasted config may carry that gproxy has no use for.
APISIX_ONLY = ("apisix.", "deployment.", "nginx_config.", "plugins", "stream_plugins",
               "plugin_attr", "discovery", "graphql", "ext-plugin", "wasm", "xrpc")

_ENV = re.compile(r"\$\{\{\s*(\w+)\s*(?::=\s*([^}]*?)\s*)?\}\}")


def _substitute(text):
    def repl(m):
        value = os.environ.get(m.group(1), m.group(2))
        if value is None:
            raise ConfigError("can't find environment variable %s" % m.group(1))
        return value
    return _ENV.sub(repl, text)


def _flatten(tree, prefix=""):
    for name, value in tree.items():
        key = prefix + str(name)
        if key in _PARENTS and value is not None and not isinstance(value, dict):
            raise ConfigError("%s: expected a mapping, got %r" % (key, value))
        if isinstance(value, dict) and (key in _PARENTS or key not in _DECLARED):
            if key in _PARENTS or value:
                yield from _flatten(value, key + ".")
                continue
        yield key, value


class Config:
    """Validated settings: ``cfg["gproxy.preread.timeout"]``; ``cfg.path`` is the file.

    ``stream_enabled`` is APISIX's stream switch: off when the config has no
    ``apisix.stream_proxy`` (APISIX <= 3.4's rule) or says ``proxy_mode:
    http`` (3.5+).  ``Config()`` (no config file at all) keeps the stream
    proxy on, on the default listener.
    """

    def __init__(self, raw=None, path=None):
        defaults_only = raw is None and path is None
        raw = raw or {}
        if not isinstance(raw, dict):
            raise ConfigError("config: expected a mapping at the top level")
        self.raw = raw  # as read: a worker process rebuilds its Config from it
        raw = _admin_off(raw)
        self.path = path
        self.base_dir = os.path.dirname(os.path.abspath(path)) if path else os.getcwd()
        self.values = {key: default for key, default, *_ in SETTINGS}
        validators = {key: check for key, _, check, _ in SETTINGS}
        for key, value in _flatten(raw):
            if key in validators:
                self.values[key] = value
            elif key.startswith(APISIX_ONLY):
                log.info("config: %s is an APISIX setting gproxy does not use; ignored", key)
            else:
                log.warning("config: unknown key %s ignored", key)
        for key, check in validators.items():
            self.values[key] = check(self.values[key], key)
        self._check_admin_exposure()
        self.stream_enabled = self["apisix.proxy_mode"] != "http" and (
            defaults_only or (raw.get("apisix") or {}).get("stream_proxy") is not None)
        self._check_https_admin()

    def __getitem__(self, key):
        return self.values[key]

    @property
    def store_backend(self):
        """``etcd`` or ``file``, from APISIX's role and its config_provider."""
        role = self["deployment.role"]
        provider = self["deployment.role_%s.config_provider" % role]
        return "etcd" if provider == "etcd" else "file"

    @property
    def store_path(self):
        return os.path.join(self.base_dir, self["gproxy.store.path"])

    def admin_file(self, key):
        """An Admin TLS file path from ``key``, relative to the config file; None if unset."""
        value = self[key]
        return os.path.join(self.base_dir, value) if value else None

    def _check_https_admin(self):
        """APISIX: ``https_admin`` without a certificate and key is a fatal error."""
        mtls = "deployment.admin.admin_api_mtls."
        if self["deployment.admin.https_admin"] and not (
                self[mtls + "admin_ssl_cert"] and self[mtls + "admin_ssl_cert_key"]):
            raise ConfigError("deployment.admin.https_admin: missing ssl cert for https admin "
                              "(set deployment.admin.admin_api_mtls.admin_ssl_cert and "
                              "admin_ssl_cert_key)")

    def _check_admin_exposure(self):
        host = self["deployment.admin.admin_listen.ip"]
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            raise ConfigError("deployment.admin.admin_listen.ip: %r is not an IP address"
                              % host) from None
        keys = [k["key"] for k in self["deployment.admin.admin_key"]]
        if (not loopback and self["apisix.enable_admin"] and DEFAULT_ADMIN_KEY in keys
                and self["deployment.admin.admin_key_required"]):
            raise ConfigError(
                "deployment.admin.admin_key: the default admin key must not be used on "
                "the non-loopback admin address %s; set deployment.admin.admin_key to "
                "[{name: admin, key: <your own random key>, role: admin}]" % host)


def _admin_off(raw):
    """``deployment.admin: false`` is short for ``apisix.enable_admin: false``."""
    deployment, apisix = raw.get("deployment"), raw.get("apisix") or {}
    if (not isinstance(deployment, dict) or deployment.get("admin") is not False
            or not isinstance(apisix, dict)):
        return raw
    deployment = {k: v for k, v in deployment.items() if k != "admin"}
    return dict(raw, deployment=deployment, apisix=dict(apisix, enable_admin=False))


def load(path):
    """Read and validate a config file; a missing file means all defaults."""
    if path is None:
        return Config()
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError("config: cannot read %s: %s" % (path, exc.strerror)) from None
    try:
        raw = yaml.safe_load(_substitute(text))
    except yaml.YAMLError as exc:
        raise ConfigError("config: %s is not valid YAML: %s" % (path, exc)) from None
    return Config(raw, path)
