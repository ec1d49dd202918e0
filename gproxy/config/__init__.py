"""conf/config.yaml: APISIX-shaped settings, each declared once with default and help.

Reads the YAML (with APISIX's ``${{VAR}}`` / ``${{VAR:=default}}`` substitution),
checks every known key, warns about unknown ones, and raises ConfigError naming
the key for a wrong type or value (the CLI turns that into exit status 2).
Owns no sockets and starts nothing.  The declarations are in ``keys``, the
checks behind them in ``validate``.
"""

import ipaddress
import logging
import os
import re

import yaml

from gproxy.config.keys import SETTINGS
from gproxy.config.validate import (DEFAULT_ADMIN_KEY, LOG_LEVELS, PY_LEVELS,  # noqa: F401
                                    ListenerSpec)
from gproxy.errors import ConfigError

log = logging.getLogger("gproxy.config")

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
        self._check_discovery(raw)

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
        return self.file_path(self[key])

    def file_path(self, value):
        """A path from the config, relative to the config file's directory; None if unset."""
        return os.path.join(self.base_dir, value) if value else None

    def _check_https_admin(self):
        """APISIX: ``https_admin`` without a certificate and key is a fatal error."""
        mtls = "deployment.admin.admin_api_mtls."
        if self["deployment.admin.https_admin"] and not (
                self[mtls + "admin_ssl_cert"] and self[mtls + "admin_ssl_cert_key"]):
            raise ConfigError("deployment.admin.https_admin: missing ssl cert for https admin "
                              "(set deployment.admin.admin_api_mtls.admin_ssl_cert and "
                              "admin_ssl_cert_key)")

    @property
    def dns_discovery(self):
        """True when ``discovery.dns`` names DNS servers (or a resolv.conf)."""
        return bool(self["discovery.dns.servers"] or self["discovery.dns.resolv_conf"])

    def _check_discovery(self, raw):
        """APISIX's dns discovery schema: ``servers`` or ``resolv_conf``, one of them."""
        dns = (raw.get("discovery") or {}).get("dns") if isinstance(raw.get("discovery"),
                                                                   dict) else None
        if dns is None:
            return
        given = [k for k in ("servers", "resolv_conf") if self["discovery.dns." + k]]
        if len(given) != 1:
            raise ConfigError("discovery.dns: invalid discovery dns configuration: value should "
                              "match only one schema, but matches %s"
                              % ("none" if not given else "both schemas 1 and 2"))

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
