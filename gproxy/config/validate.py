"""The checks behind every setting: types, ports, listeners, CIDRs, admin keys.

Each validator takes ``(value, key)`` and returns the value to use (possibly
converted, e.g. a list of ``ListenerSpec``) or raises ConfigError naming the key.
Pure: no files, no sockets.
"""

import ipaddress
import logging
import re
from dataclasses import dataclass

from gproxy.errors import ConfigError
from gproxy.model.logformat import STREAM_VARIABLES, compile_format

DEFAULT_ADMIN_KEY = "edd1c9f034335f136f87ad84b625c8f1"
#: APISIX 3.x's ``apisix.data_encryption.keyring`` default (config-default.yaml).
DEFAULT_KEYRING = ("qeddd145sfvddff3", "edd1c9f0985e76a2")
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


def port(value, key):
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
                flags[flag] = boolean(item[flag], "%s.%s" % (key, flag))
        item = item["addr"]
    if isinstance(item, int) and not isinstance(item, bool):
        port_ = port(item, key)  # all addresses, IPv4 and (where available) IPv6
        return [ListenerSpec("0.0.0.0", port_, **flags),
                ListenerSpec("::", port_, optional=True, **flags)]
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


def typed(kind, check=None, what=None):
    def validate(value, key):
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        if not ok or (check and not check(value)):
            raise ConfigError("%s: expected %s, got %r" % (key, what or kind.__name__, value))
        return value
    return validate


def choice(*allowed):
    return typed(str, lambda v: v in allowed, "one of " + ", ".join(allowed))


def log_format(value, key):
    """An nginx log_format naming only variables the stream access log has."""
    typed(str)(value, key)
    try:
        compile_format(value, STREAM_VARIABLES)
    except ValueError as exc:
        raise ConfigError("%s: %s" % (key, exc)) from None
    return value


DNS_TYPES = ("last", "SRV", "A", "AAAA", "CNAME")


def dns_servers(value, key):
    """APISIX's ``discovery.dns.servers``: ``["ip", "ip:port", "[v6]:port"]`` (or null)."""
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise ConfigError("%s: expected a non-empty list of \"ip[:port]\"" % key)
    for item in value:
        host, port = _host_port(item)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError("%s: %r is not an IP address with an optional port"
                              % (key, item)) from None
        if port is not None and not 0 < port < 65536:
            raise ConfigError("%s: %r: port out of range" % (key, item))
    return value


def _host_port(item):
    if not isinstance(item, str):
        return repr(item), None
    if item.startswith("["):
        host, _, rest = item[1:].partition("]")
        return host, int(rest[1:]) if rest[1:].isdigit() else (None if not rest else -1)
    if item.count(":") == 1:
        host, port = item.split(":")
        return host, int(port) if port.isdigit() else -1
    return item, None


def dns_order(value, key):
    """``discovery.dns.order``: 1-5 distinct record types (APISIX's schema)."""
    if (not isinstance(value, list) or not 1 <= len(value) <= 5 or len(set(value)) != len(value)
            or not all(v in DNS_TYPES for v in value)):
        raise ConfigError("%s: expected 1 to 5 distinct items of %s" % (key, ", ".join(DNS_TYPES)))
    return value


def cidrs(value, key):
    if not isinstance(value, list):
        raise ConfigError("%s: expected a list of CIDRs" % key)
    try:
        return [ipaddress.ip_network(v, strict=False) for v in value]
    except (ValueError, TypeError) as exc:
        raise ConfigError("%s: %s" % (key, exc)) from None


def admin_keys(value, key):
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


def optional_text(value, key):
    if value is not None and (not isinstance(value, str) or not value):
        raise ConfigError("%s: expected a non-empty string or null, got %r" % (key, value))
    return value


def command(value, key):
    """null, or a program and its arguments as a non-empty list of strings."""
    if value is not None and (not isinstance(value, list) or not value
                              or not all(isinstance(v, str) and v for v in value)):
        raise ConfigError("%s: expected a list of arguments (strings) or null, got %r"
                          % (key, value))
    return value


def etcd_hosts(value, key):
    if isinstance(value, str):
        value = [value]
    if (not isinstance(value, list) or not value or not all(
            isinstance(v, str) and re.match(r"^https?://[^/]+$", v.rstrip("/")) for v in value)):
        raise ConfigError("%s: expected a list of http(s)://host:port URLs, got %r" % (key, value))
    return [v.rstrip("/") for v in value]


def keyring(value, key):
    """APISIX's schema: a key or a non-empty list of keys, each 16 (AES-128) or 32
    (AES-256, APISIX 3.18+) characters; null: no encryption."""
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(
            isinstance(v, str) and len(v.encode()) in (16, 32) for v in items):
        raise ConfigError("%s: expected null, or a key or non-empty list of keys of 16 or 32 "
                          "characters" % key)
    return items


number = typed((int, float), lambda v: v > 0, "a number > 0")
count = typed(int, lambda v: v > 0, "an integer > 0")
boolean = typed(bool)


def optional_str(value, key):
    if value is not None and not isinstance(value, str):
        raise ConfigError("%s: expected a string, got %r" % (key, value))
    return value or None

#: (key, default, validator, help). The one place each setting is declared.
