"""The OpenAPI document's schemas, derived from the ones the Admin API checks with.

Nothing here restates a resource: ``components()`` walks the very objects
``model.resources`` and ``model.ssls`` validate with (and the plugin schemas
``check_plugins`` uses) when the document is built, so a field, bound or
pattern added there is in the document at once.  What the walk adds is what
the checks do around the schema: the timestamps a write may not send, the
plugins object (one schema per known stream plugin, nothing else), an ssl
object's ``sni``/``snis``/``key``/``cert`` rule (APISIX's ``if``/``then``/
``else``) and its private keys never shown.  Sub-schemas shared by identity
(the upstream inside a route, ids, health checks) become ``$ref``s.  The
answers of gproxy's own extensions are described here too.  Pure.
"""

import copy

from gproxy.model.resources import (CHECKS_SCHEMA, ID_SCHEMA, STREAM_PLUGINS,
                                    STREAM_ROUTE_SCHEMA, UPSTREAM_SCHEMA)
from gproxy.model.ssls import SECRET_FIELDS, SSL_SCHEMA

TIMESTAMPS = ("create_time", "update_time")
#: APISIX's ssl schema rule (schema_def.lua), which ``check_ssl`` applies by hand.
SSL_RULE = {
    "if": {"properties": {"type": {"const": "server"}}},
    "then": {"oneOf": [{"required": ["sni", "key", "cert"]},
                       {"required": ["snis", "key", "cert"]}]},
    "else": {"required": ["key", "cert"]},
}


def ref(name):
    return {"$ref": "#/components/schemas/" + name}


def _plugin_name(name):
    return "Plugin_" + name.replace("-", "_")


def _walk(schema, shared, top):
    """A deep copy of ``schema`` with every object in ``shared`` (by identity) as a $ref."""
    if not top and id(schema) in shared:
        return ref(shared[id(schema)])
    if isinstance(schema, dict):
        return {k: _walk(v, shared, False) for k, v in schema.items()}
    if isinstance(schema, list):
        return [_walk(v, shared, False) for v in schema]
    return copy.deepcopy(schema)


def _without(schema, names):
    out = dict(schema, properties={k: v for k, v in schema["properties"].items()
                                   if k not in names})
    if "required" in out:
        out["required"] = [r for r in out["required"] if r not in names]
    return out


def _object(properties, required=(), more=True):
    out = {"type": "object", "properties": properties}
    if required:
        out["required"] = list(required)
    if not more:
        out["additionalProperties"] = False
    return out


def resource_schemas():
    """Stored and writable forms of the three resources, plus what they share."""
    shared = {id(ID_SCHEMA): "Id", id(CHECKS_SCHEMA): "HealthChecks",
              id(UPSTREAM_SCHEMA): "UpstreamInput"}
    shared.update({id(s): _plugin_name(n) for n, s in STREAM_PLUGINS.items()})
    out = {"Id": _walk(ID_SCHEMA, shared, True),
           "HealthChecks": _walk(CHECKS_SCHEMA, shared, True)}
    out.update({_plugin_name(n): _walk(s, shared, True) for n, s in STREAM_PLUGINS.items()})
    upstream = _walk(UPSTREAM_SCHEMA, shared, True)
    out["Upstream"] = upstream
    out["UpstreamInput"] = _without(upstream, TIMESTAMPS)  # also a route's inline upstream
    route = _walk(STREAM_ROUTE_SCHEMA, shared, True)
    route["properties"]["plugins"] = _object(
        {name: ref(_plugin_name(name)) for name in sorted(STREAM_PLUGINS)}, more=False)
    out["StreamRoute"] = route
    out["StreamRouteInput"] = _without(route, TIMESTAMPS)
    ssl = _walk(SSL_SCHEMA, shared, True)
    out["SSL"] = _without(ssl, SECRET_FIELDS)  # never in an answer
    out["SSLInput"] = dict(_without(ssl, TIMESTAMPS), **SSL_RULE)
    out["Patch"] = {"type": "object", "description": "RFC 7386 merge patch: objects merge, "
                    "null deletes a field, arrays replace; the result is checked whole"}
    return out


def envelope_schemas(kinds):
    """The Admin API's envelopes around resources, as APISIX 3.x sends them."""
    out = {}
    for kind in kinds:
        out[kind + "Item"] = _object({"key": {"type": "string"}, "value": ref(kind),
                                      "createdIndex": {"type": "integer"},
                                      "modifiedIndex": {"type": "integer"}},
                                     ("key", "value"))
        out[kind + "List"] = _object({"list": {"type": "array", "items": ref(kind + "Item")},
                                      "total": {"type": "integer", "minimum": 0}},
                                     ("list", "total"))
    out["Deleted"] = _object({"deleted": {"const": "1"}, "key": {"type": "string"}},
                             ("deleted", "key"))
    out["Error"] = _object({"error_msg": {"type": "string"},
                            "req_body": {"type": "string"},
                            "description": {"type": "string"}}, ("error_msg",))
    out["NotFound"] = {"type": "object", "anyOf": [
        _object({"message": {"const": "Key not found"}}, ("message",)),
        _object({"error_msg": {"type": "string"}}, ("error_msg",))]}
    return out


def extension_schemas():
    """gproxy's own answers under /apisix/admin/gproxy/ (docs/sessions.md)."""
    counts = {"type": "object", "additionalProperties": {"type": "integer"}}
    number = {"type": "number"}
    session = _object({"id": {"type": "string"}, "client_addr": {"type": "string"},
                       "client_port": {"type": "integer"}, "state": {"type": "string"},
                       "bytes_in": {"type": "integer"}, "bytes_out": {"type": "integer"},
                       "instance": {"type": "string"}},
                      ("id", "client_addr", "state"))
    unreachable = {"type": "array", "items": {"type": "object"}}
    note = {"type": "string"}
    job = _object({"id": {"type": "string"}, "state": {"type": "string"},
                   "total": {"type": "integer"}, "done": {"type": "integer"},
                   "failed": {"type": "integer"}, "gone": {"type": "integer"},
                   "remaining": {"type": "integer"}, "rate": {"type": ["number", "null"]},
                   "selector": {"type": "object"}, "started_at": number,
                   "finished_at": {"type": ["number", "null"]}, "elapsed": number},
                  ("id", "state", "total", "done", "remaining"))
    return {
        "Session": session,
        "SessionPage": _object({"total": {"type": "integer"},
                                "list": {"type": "array", "items": ref("Session")},
                                "per_node": counts, "page": {"type": "integer"},
                                "page_size": {"type": "integer"}, "now": number,
                                "unreachable": unreachable, "note": note},
                               ("total", "list", "page", "page_size")),
        "Instances": _object({"list": {"type": "array", "items": {"type": "object"}},
                              "total": {"type": "integer"}, "per_node": counts,
                              "unreachable": unreachable, "note": note}, ("list", "total")),
        "Closed": _object({"closed": {"type": "array", "items": {"type": "string"}}},
                          ("closed",)),
        "Stats": _object({"live_sessions": {"type": "integer"},
                          "sessions_total": {"type": "integer"}, "rejected": counts,
                          "bytes_in": {"type": "integer"}, "bytes_out": {"type": "integer"},
                          "per_node": counts, "per_route": counts, "per_state": counts,
                          "started_at": number}, ("live_sessions", "sessions_total")),
        "Eviction": job,
        "EvictionList": _object({"list": {"type": "array", "items": ref("Eviction")},
                                 "total": {"type": "integer"}}, ("list", "total")),
        "HealthList": _object({"list": {"type": "array", "items": {"type": "object"}},
                               "total": {"type": "integer"}}, ("list", "total")),
        "PluginNames": {"type": "array", "items": {"enum": sorted(STREAM_PLUGINS)}},
        "OpenAPI": _object({"openapi": {"type": "string"}, "paths": {"type": "object"}},
                           ("openapi", "paths")),
    }


def components():
    schemas = resource_schemas()
    schemas.update(envelope_schemas(("StreamRoute", "Upstream", "SSL")))
    schemas.update(extension_schemas())
    return schemas
