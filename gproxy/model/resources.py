"""APISIX's schemas and Admin-API checks for stream routes and upstreams.

Owns what a stored ``stream_routes`` or ``upstreams`` object may look like and
the exact ``error_msg`` wording APISIX returns when it may not
(docs/apisix-behaviour.md §3, §4.1, §5.1).  Pure: it is handed a lookup for
referenced ids instead of reaching into a store.

Where APISIX's schemas set no bound, gproxy's add one (``maxLength``,
``maxItems``, ``maxProperties``, ``propertyNames``), far beyond any real
value, declared in the schema objects themselves so the checks and the
OpenAPI document say the same: one request's checks, its table update and
its storage then stay within a few milliseconds of the hub.  A chash ring is
bounded too (``MAX_RING_POINTS``).  Every pattern runs on RE2 (``schema``).
"""

import json

from gproxy.errors import SchemaError
from gproxy.model.iprestriction import IP_DEF as _IP_DEF
from gproxy.model.iprestriction import IP_RESTRICTION_SCHEMA, check_ips
from gproxy.model.iprestriction import network as ip_network  # routes use it too
from gproxy.model.balancer import CHASH_POINTS_PER_WEIGHT, MAX_RING_POINTS, ring_points
from gproxy.model.limits import LIMIT_CONN_SCHEMA, LIMIT_RATE_SCHEMA
from gproxy.model.mqttproxy import check_mqtt_proxy, split_upstream_ids
from gproxy.model.schema import check, matches, validate

ID_SCHEMA = {"anyOf": [
    {"type": "string", "minLength": 1, "maxLength": 64, "pattern": r"^[a-zA-Z0-9-_.]+$"},
    {"type": "integer", "minimum": 1},
]}
HOST_PATTERN = r"^\*?[0-9a-zA-Z-._\[\]:]+$"
#: APISIX's labels: values ``^\S+$`` of 1-256 characters (gproxy: at most 256
#: labels, keys of at most 256 characters).
LABELS = {"type": "object", "maxProperties": 256, "propertyNames": {"maxLength": 256},
          "patternProperties": {
              ".*": {"type": "string", "pattern": r"^\S+$", "minLength": 1, "maxLength": 256}}}
HOST = {"type": "string", "pattern": HOST_PATTERN, "maxLength": 256}
_TIME = {"type": "integer"}
_COMMON = {
    "id": ID_SCHEMA,
    "name": {"type": "string", "minLength": 1, "maxLength": 256},
    "desc": {"type": "string", "maxLength": 256},
    "labels": LABELS,
    "create_time": _TIME,
    "update_time": _TIME,
}
_NODES = {"anyOf": [
    {"type": "object", "maxProperties": 1000, "propertyNames": {"maxLength": 320},
     "patternProperties": {".*": {"type": "integer", "minimum": 0}}},
    {"type": "array", "maxItems": 1000, "items": {
        "type": "object",
        "properties": {
            "host": {"type": "string", "pattern": r"^\*$|" + HOST_PATTERN, "maxLength": 256},
            "port": {"type": "integer", "minimum": 1, "maximum": 65535},
            "weight": {"type": "integer", "minimum": 0},
            "priority": {"type": "integer"},
            "metadata": {"type": "object", "maxProperties": 256},
        },
        "required": ["host", "weight"],
    }},
]}
_POSITIVE = {"type": "number", "exclusiveMinimum": 0}
_STATUSES = {"type": "array", "minItems": 1, "uniqueItems": True,
             "items": {"type": "integer", "minimum": 200, "maximum": 599}}
_COUNT = {"type": "integer", "minimum": 1, "maximum": 254}
_COUNT0 = {"type": "integer", "minimum": 0, "maximum": 254}
_INTERVAL = {"type": "integer", "minimum": 1}
#: APISIX's health_checker schema (schema_def.lua), plus gproxy's ``type: mqtt``
#: probe and its ``mqtt`` settings (an extension: CONNECT, CONNACK, DISCONNECT).
CHECKS_SCHEMA = {
    "type": "object",
    "properties": {
        "active": {"type": "object", "properties": {
            "type": {"type": "string", "enum": ["http", "https", "tcp", "mqtt"]},
            "timeout": {"type": "number"},
            "concurrency": {"type": "integer"},
            "host": HOST,
            "port": {"type": "integer", "minimum": 1, "maximum": 65535},
            "http_path": {"type": "string", "maxLength": 4096},
            "https_verify_certificate": {"type": "boolean"},
            "req_headers": {"type": "array", "minItems": 1, "maxItems": 64,
                            "items": {"type": "string", "maxLength": 4096}},
            "healthy": {"type": "object", "properties": {
                "interval": _INTERVAL, "http_statuses": _STATUSES, "successes": _COUNT}},
            "unhealthy": {"type": "object", "properties": {
                "interval": _INTERVAL, "http_statuses": _STATUSES, "http_failures": _COUNT,
                "tcp_failures": _COUNT, "timeouts": _COUNT}},
            "mqtt": {"type": "object", "properties": {
                "protocol_level": {"type": "integer", "enum": [3, 4, 5]},
                "client_id": {"type": "string", "maxLength": 256},
                "username": {"type": "string", "maxLength": 65535},
                "password": {"type": "string", "maxLength": 65535}},
                "additionalProperties": False},
        }},
        "passive": {"type": "object", "properties": {
            "type": {"type": "string", "enum": ["http", "https", "tcp"]},
            "healthy": {"type": "object", "properties": {
                "http_statuses": _STATUSES, "successes": _COUNT0}},
            "unhealthy": {"type": "object", "properties": {
                "http_statuses": _STATUSES, "http_failures": _COUNT0,
                "tcp_failures": _COUNT0, "timeouts": _COUNT0}},
        }},
    },
    "anyOf": [{"required": ["active"]}, {"required": ["active", "passive"]}],
    "additionalProperties": False,
}
UPSTREAM_SCHEMA = {
    "type": "object",
    "properties": dict(_COMMON, **{
        "nodes": _NODES,
        "retries": {"type": "integer", "minimum": 0},
        "retry_timeout": {"type": "number", "minimum": 0},
        "timeout": {"type": "object", "properties": {
            "connect": _POSITIVE, "send": _POSITIVE, "read": _POSITIVE},
            "required": ["connect", "send", "read"]},
        "type": {"type": "string", "maxLength": 64},
        "checks": CHECKS_SCHEMA,
        "hash_on": {"type": "string", "enum": [
            "vars", "header", "cookie", "consumer", "vars_combinations"]},
        "key": {"type": "string", "maxLength": 1024},
        "scheme": {"type": "string", "enum": [
            "grpc", "grpcs", "http", "https", "tcp", "tls", "udp", "kafka"]},
        "discovery_type": {"type": "string", "maxLength": 256},
        "discovery_args": {"type": "object", "maxProperties": 64},
        "pass_host": {"type": "string", "enum": ["pass", "node", "rewrite"]},
        "upstream_host": HOST,
        "service_name": {"type": "string", "minLength": 1, "maxLength": 256},
        "tls": {"type": "object", "properties": {
            "client_cert_id": ID_SCHEMA,
            "client_cert": {"type": "string", "minLength": 128, "maxLength": 64 * 1024},
            "client_key": {"type": "string", "minLength": 64, "maxLength": 64 * 1024},
            "verify": {"type": "boolean"}}},
        "keepalive_pool": {"type": "object", "maxProperties": 16},
    }),
    "oneOf": [{"required": ["nodes"]}, {"required": ["service_name", "discovery_type"]}],
    "additionalProperties": False,
}
STREAM_ROUTE_SCHEMA = {
    "type": "object",
    "properties": dict(_COMMON, **{
        "remote_addr": _IP_DEF,
        "server_addr": _IP_DEF,
        "server_port": {"type": "integer", "minimum": 1, "maximum": 65535},
        "sni": {"type": "string", "pattern": r"^\*$|^\*?[0-9a-zA-Z-._\[\]:]+$",
                "maxLength": 256},
        "upstream": UPSTREAM_SCHEMA,
        "upstream_id": ID_SCHEMA,
        "service_id": ID_SCHEMA,
        "plugins": {"type": "object", "maxProperties": 64},
        "protocol": {"type": "object", "properties": {"name": {"type": "string",
                                                                "maxLength": 256}},
                     "required": ["name"]},
    }),
    "additionalProperties": False,
}
#: gproxy's extension (docs/websocket.md): MQTT over WebSocket on the same route.
#: APISIX's mqtt-proxy schema has no additionalProperties, so APISIX accepts
#: (and ignores) this key too: a route using it still loads there.
WEBSOCKET_SCHEMA = {
    "type": "object",
    "properties": {
        "enable": {"type": "boolean"},
        "path": {"type": "string", "pattern": "^/", "maxLength": 4096},
        "allow_origins": {"type": "array", "maxItems": 256,
                          "items": {"type": "string", "minLength": 1, "maxLength": 4096}},
        "mode": {"type": "string", "enum": ["terminate", "passthrough"]},
    },
    "additionalProperties": False,
}
#: gproxy's extension, NGINX Plus's ``mqtt_set_connect``: CONNECT fields set from
#: ``$variable`` templates before the replay (docs/tls.md).
SET_CONNECT_SCHEMA = {
    "type": "object",
    "properties": {"client_id": {"type": "string", "minLength": 1, "maxLength": 1024},
                   "username": {"type": "string", "minLength": 1, "maxLength": 1024}},
    "additionalProperties": False,
}
#: gproxy's extension (docs/routing.md): a sticky split of a route's clients
#: between upstreams by a hash of their client id, shaped like APISIX's
#: traffic-split ``weighted_upstreams`` (an entry without ``upstream_id`` is the
#: route's own upstream).
TRAFFIC_SPLIT_SCHEMA = {
    "type": "object",
    "properties": {
        "key": {"type": "string", "enum": ["mqtt_client_id", "mqtt_username", "tls_client_cn",
                                           "remote_addr"]},
        "salt": {"type": "string", "maxLength": 256},
        "weighted_upstreams": {"type": "array", "minItems": 1, "maxItems": 64, "items": {
            "type": "object",
            "properties": {"upstream_id": ID_SCHEMA,
                           "upstream": {"type": "object"},
                           "weight": {"type": "integer", "minimum": 0}},
        }},
    },
    "required": ["weighted_upstreams"],
    "additionalProperties": False,
}
#: mqtt-proxy's schema: no additionalProperties, so the deprecated ``upstream`` is
#: accepted, and APISIX loads a route with gproxy's extensions (it ignores them):
#: ``vars`` + ``priority`` choose among routes by the CONNECT (docs/routing.md).
MQTT_PROXY_SCHEMA = {
    "type": "object",
    "properties": {"protocol_name": {"type": "string", "maxLength": 256},
                   "protocol_level": {"type": "integer"},
                   "websocket": WEBSOCKET_SCHEMA,
                   "set_connect": SET_CONNECT_SCHEMA,
                   "vars": {"type": "array", "maxItems": 256},
                   "priority": {"type": "integer"},
                   "traffic_split": TRAFFIC_SPLIT_SCHEMA},
    "required": ["protocol_level"],
}
STREAM_PLUGINS = {"mqtt-proxy": MQTT_PROXY_SCHEMA, "limit-conn": LIMIT_CONN_SCHEMA,
                  "gproxy-limit-rate": LIMIT_RATE_SCHEMA, "ip-restriction": IP_RESTRICTION_SCHEMA}

CHASH_VAR_KEY = (
    r"^((uri|server_name|server_addr|request_uri|remote_port|remote_addr|query_string"
    r"|host|hostname|mqtt_client_id)|arg_[0-9a-zA-z_-]+)$")
#: gproxy's additions to APISIX's list (docs/tls.md); a key that is neither in
#: the list nor here gets APISIX's message, whose pattern it fails too.
GPROXY_VAR_KEYS = ("mqtt_username", "tls_client_cn")


def check_plugins(plugins):
    for name, conf in plugins.items():
        schema = STREAM_PLUGINS.get(name)
        if schema is None:
            raise SchemaError("unknown plugin [%s]" % name)
        if not isinstance(conf, dict):
            raise SchemaError("invalid plugin conf %s for plugin [%s]"
                              % (json.dumps(conf), name))
        err = validate(schema, conf) or _EXTRA_CHECKS.get(name, _none)(conf)
        if err:
            raise SchemaError("failed to check the configuration of stream plugin [%s]: %s"
                              % (name, err))


def _none(conf):
    return None


#: A plugin's ``check_schema`` beyond its JSON schema (mqtt-proxy's: model.mqttproxy).
_EXTRA_CHECKS = {"mqtt-proxy": check_mqtt_proxy, "ip-restriction": check_ips}


def _weight_groups(nodes):
    """The node weights of each priority group, from either node form."""
    if isinstance(nodes, dict):
        return [list(nodes.values())]
    groups = {}
    for node in nodes or ():
        groups.setdefault(node.get("priority", 0), []).append(node["weight"])
    return list(groups.values())


def check_ring(conf, prefix="invalid configuration: "):
    """gproxy's bound on a ``chash`` upstream's ring (a schema-checked ``conf``)."""
    if conf.get("type") != "chash":
        return
    points = ring_points(_weight_groups(conf.get("nodes")))
    if points > MAX_RING_POINTS:
        raise SchemaError(
            '%sproperty "nodes" validation failed: the weights make a chash ring of %d '
            "points, expected at most %d (%d points per unit of weight, once the weights "
            "are divided by their greatest common divisor)"
            % (prefix, points, MAX_RING_POINTS, CHASH_POINTS_PER_WEIGHT))


def check_stream_route(conf, upstream_exists=lambda _id: True, pause=None):
    """Raise SchemaError with APISIX's message unless ``conf`` is a valid stream route
    (``pause``: called now and then over long arrays, see ``schema.validate``)."""
    check(STREAM_ROUTE_SCHEMA, conf, pause=pause)
    if isinstance(conf.get("upstream"), dict):
        check_ring(conf["upstream"], 'invalid configuration: property "upstream" validation '
                                     "failed: ")
    for field in ("remote_addr", "server_addr"):
        if field in conf:
            try:
                ip_network(conf[field])
            except ValueError:
                raise SchemaError("invalid %s: %s" % (field, conf[field])) from None
    if "upstream_id" in conf and not upstream_exists(str(conf["upstream_id"])):
        raise SchemaError("failed to fetch upstream info by upstream id [%s], "
                          "response code: 404" % conf["upstream_id"])
    if "service_id" in conf:
        raise SchemaError("failed to fetch service info by service id [%s], "
                          "response code: 404" % conf["service_id"])
    check_plugins(conf.get("plugins") or {})
    for upstream_id in split_upstream_ids(conf):
        if not upstream_exists(upstream_id):
            raise SchemaError("failed to check the configuration of stream plugin [mqtt-proxy]: "
                              "failed to fetch upstream info by upstream id [%s], "
                              "response code: 404" % upstream_id)
    if isinstance(conf.get("protocol"), dict):
        # APISIX's xrpc.check_schema: no xRPC protocol is registered in gproxy
        raise SchemaError("unknown protocol [%s]" % conf["protocol"]["name"])


def check_upstream(conf, pause=None):
    """``check_upstream_conf`` as APISIX runs it for ``/upstreams`` (not for stream routes)."""
    check(UPSTREAM_SCHEMA, conf, pause=pause)
    check_ring(conf)
    nodes = conf.get("nodes")
    if isinstance(nodes, dict):
        for addr in nodes:
            host, _, port = addr.rpartition(":")
            if ":" in host and not host.startswith("["):
                raise SchemaError("invalid configuration: "
                                  "IPv6 address must be enclosed with '[' and ']'")
            if port and (not port.isdigit() or not 1 <= int(port) <= 65535):
                raise SchemaError("invalid port %s" % port)
    elif isinstance(nodes, list):
        for node in nodes:
            host = node.get("host", "")
            if host.count(":") > 1 and not host.startswith("["):
                raise SchemaError("invalid configuration: "
                                  "IPv6 address must be enclosed with '[' and ']'")
    tls = conf.get("tls") or {}
    if ("client_cert" in tls) != ("client_key" in tls):
        raise SchemaError('invalid configuration: property "tls" validation failed: '
                          'client_cert and client_key must be given together')
    if conf.get("type") == "chash" and conf.get("hash_on", "vars") != "consumer":
        key = conf.get("key")
        if not key:
            raise SchemaError("missing key")
        if (conf.get("hash_on", "vars") == "vars" and not matches(CHASH_VAR_KEY, key)
                and key not in GPROXY_VAR_KEYS):
            raise SchemaError('invalid configuration: failed to match pattern "%s" with "%s"'
                              % (CHASH_VAR_KEY, key))
