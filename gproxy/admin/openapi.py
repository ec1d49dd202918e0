"""The Admin API as an OpenAPI 3.1 document: ``document()``.

Served at ``GET /apisix/admin/gproxy/openapi.json`` (the key rules of every
Admin read) and shipped as ``docs/admin-api.openapi.json`` (a test checks the
copy equals what this builds; ``python -m gproxy.admin.openapi`` writes it).
The operations, parameters and answers are listed here, APISIX's resources
(``stream_routes``, ``upstreams``, ``ssls``, ``plugins``) first, then
gproxy's extensions under ``/apisix/admin/gproxy/``; the schemas come from
``openapi_schemas``, which builds them from the objects the checks use, so
the document cannot drift from what the Admin API accepts.  The test
command fuzzes a live gproxy from it with schemathesis.  Pure.
"""

import json

from gproxy import __version__
from gproxy.admin.openapi_schemas import components, ref

PREFIX = "/apisix/admin"
RESOURCES = (("stream_routes", "StreamRoute", "stream route"),
             ("upstreams", "Upstream", "upstream"), ("ssls", "SSL", "ssl"))
#: APISIX takes the key from any of these (docs/admin-api.md)
SECURITY = {"header": {"type": "apiKey", "in": "header", "name": "X-API-KEY"},
            "query": {"type": "apiKey", "in": "query", "name": "api_key"},
            "cookie": {"type": "apiKey", "in": "cookie", "name": "x_api_key"}}


def _json(schema):
    return {"application/json": {"schema": schema}}


def _answer(description, schema=None, text=False):
    out = {"description": description}
    if schema is not None:
        out["content"] = _json(schema)
    if text:  # page_size out of bounds: APISIX's plain-text 400
        out.setdefault("content", {})["text/plain"] = {"schema": {"type": "string"}}
    return out


def _answers(ok, *errors, created=None):
    """``{status: response}``: ``ok`` (the 200 schema) and the error statuses listed."""
    out = {"200": _answer("OK", ok)}
    if created is not None:
        out["201"] = _answer("Created", created)
    common = {"400": _answer("Bad request (APISIX's error_msg)", ref("Error"), text=True),
              "401": _answer("No key, a wrong key, or a viewer key for a write", ref("Error")),
              "403": {"description": "Client address outside deployment.admin.allow_admin",
                      "content": {"text/html": {"schema": {"type": "string"}}}},
              "404": _answer("Not found", ref("NotFound")),
              "405": _answer("Method not allowed", ref("Error")),
              "413": _answer("Body over 1 MiB", ref("Error")),
              "414": {"description": "Request line over 8 KiB (no body)"},
              "503": _answer("The store (etcd) is unavailable", ref("Error"))}
    out.update({code: common[code] for code in errors + ("401", "403", "414")})
    return out


def _refusal(status):
    """The answers of an operation that always refuses with ``status``."""
    return {k: v for k, v in _answers(None, status).items() if k != "200"}


def _param(name, where, schema, description=None, required=None):
    out = {"name": name, "in": where, "schema": schema}
    if description:
        out["description"] = description
    if required or where == "path":
        out["required"] = True
    return out


PAGE = [_param("page", "query", {"type": "integer", "minimum": 1}),
        _param("page_size", "query", {"type": "integer", "minimum": 10, "maximum": 500})]
ID = _param("id", "path", {"type": "string", "minLength": 1, "maxLength": 64,
                           "pattern": r"^[a-zA-Z0-9-_.]+$"})


def _body(schema):
    return {"required": True, "content": _json(schema)}


def _write(summary, body, ok, *errors, created=None):
    return {"summary": summary, "requestBody": _body(body),
            "responses": _answers(ok, *errors, created=created)}


def _collection(name, schema, kind):
    """``/<resource>``: list, PUT with the id in the body, POST for a new id."""
    item = ref(schema + "Item")
    filters = [_param("name", "query", {"type": "string", "maxLength": 1024},
                      "regular expression on the name (RE2)"),
               _param("label", "query", {"type": "string"}, "key or key:value")]
    if name == "stream_routes":
        filters.append(_param("upstream_id", "query", {"type": "string"}))
    return {
        "get": {"summary": "List %ss" % kind, "parameters": PAGE + filters,
                "responses": _answers(ref(schema + "List"), "400", "503")},
        "delete": {"summary": "Refused: the %s id is missing (APISIX's 400)" % kind,
                   "responses": _refusal("400")},
        "put": _write("Create or replace a %s (id in the body)" % kind, ref(schema + "Input"),
                      item, "400", "413", "503", created=item),
        "post": _write("Create a %s with a new id" % kind, ref(schema + "Input"), item,
                       "400", "413", "503", created=item),
    }


def _one(name, schema, kind):
    """``/<resource>/{id}``: get, PUT, DELETE (``?force`` for upstreams)."""
    item = ref(schema + "Item")
    one = {
        "parameters": [ID],
        "get": {"summary": "Get a %s" % kind, "responses": _answers(item, "400", "404", "503")},
        "put": _write("Create or replace a %s" % kind, ref(schema + "Input"), item,
                      "400", "413", "503", created=item),
        "delete": {"summary": "Delete a %s" % kind,
                   "responses": _answers(ref("Deleted"), "400", "404", "503")},
        "post": {"summary": "Refused: POST makes its own id (APISIX's 400, \"do not need it\")",
                 "responses": _refusal("400")},
    }
    if name == "upstreams":
        one["delete"]["parameters"] = [_param("force", "query", {"enum": ["true", "false"]},
                                              "delete even when a route uses it")]
    return one


def _patches(name, schema, kind):
    """PATCH on the collection, one object and one field of it: ``[collection, one, field]``."""
    if name == "stream_routes":  # APISIX: "not supported `PATCH` method for stream route"
        refused = {"summary": "Refused: stream routes take no PATCH (APISIX's 405)",
                   "responses": _refusal("405")}
        return [refused] * 3
    item = ref(schema + "Item")
    return [{"summary": "Refused: the %s id is missing (APISIX's 400)" % kind,
             "responses": _refusal("400")},
            _write("Merge a patch into a %s" % kind, ref("Patch"), item,
                   "400", "404", "413", "503"),
            _write("Replace one field of a %s" % kind, {}, item, "400", "404", "413", "503")]


def resource_paths(name, schema, kind):
    """APISIX 3.x's operations on one resource (admin/resource.lua)."""
    base = "%s/%s" % (PREFIX, name)
    paths = {base: _collection(name, schema, kind), base + "/{id}": _one(name, schema, kind),
             base + "/{id}/{field}": {"parameters": [ID, _param(
                 "field", "path", {"type": "string", "pattern": r"^[^/]+$"})]}}
    for path, patch in zip(paths, _patches(name, schema, kind)):
        paths[path]["patch"] = patch
    return paths


def plugin_paths():
    return {
        PREFIX + "/plugins/list": {"get": {
            "summary": "Names of the stream plugins gproxy runs",
            "parameters": [_param("subsystem", "query", {"enum": ["stream"]})],
            "responses": _answers(ref("PluginNames"))}},
        PREFIX + "/plugins/{name}": {"get": {
            "summary": "A stream plugin's schema (?subsystem=stream)",
            "parameters": [_param("name", "path", {"type": "string"}),
                           _param("subsystem", "query", {"enum": ["stream", "http"]})],
            "responses": _answers({"type": "object"}, "404")}},
    }


def extension_paths():
    """gproxy's extensions (docs/sessions.md, docs/operations.md)."""
    base = PREFIX + "/gproxy"
    filters = [_param(n, "query", {"type": "string"}) for n in (
        "route_id", "node", "client_id", "client_addr", "state", "ids")]
    filters.append(_param("misplaced", "query", {"enum": ["true", "false"]}))
    sort = _param("sort", "query", {"type": "string"}, "a field, - first for descending")
    select = filters + [_param("all", "query", {"enum": ["true", "false"]}),
                        _param("rate", "query", {"type": "number", "exclusiveMinimum": 0},
                               "sessions ended per second")]
    job = [_param("job_id", "path", {"type": "string"})]
    fleet = _param("fleet", "query", {"enum": ["true", "false"]},
                   "every instance registered in etcd (docs/fleet.md); without etcd, this "
                   "instance with a note")
    return {
        base + "/sessions": {
            "get": {"summary": "Live sessions, one page",
                    "parameters": PAGE + filters + [sort, fleet],
                    "responses": _answers(ref("SessionPage"), "400")},
            "delete": {"summary": "End the sessions a filter selects (an eviction job)",
                       "parameters": select + [fleet],
                       "responses": _answers(ref("Eviction"), "400")}},
        base + "/instances": {"get": {
            "summary": "The fleet's instances (APISIX's data_plane/server_info records)",
            "responses": _answers(ref("Instances"))}},
        base + "/sessions/{session_id}": {"delete": {
            "summary": "Close one session at once",
            "parameters": [_param("session_id", "path", {"type": "string"})],
            "responses": _answers(ref("Closed"), "404")}},
        base + "/stats": {"get": {"summary": "Totals and live counts",
                                  "responses": _answers(ref("Stats"))}},
        base + "/evictions": {"get": {"summary": "Eviction jobs",
                                      "responses": _answers(ref("EvictionList"))}},
        base + "/evictions/{job_id}": {
            "get": {"summary": "One eviction job", "parameters": job,
                    "responses": _answers(ref("Eviction"), "404")},
            "delete": {"summary": "Cancel an eviction job", "parameters": job,
                       "responses": _answers(ref("Eviction"), "404")}},
        base + "/health": {"get": {"summary": "Health checkers, as /v1/healthcheck lists them",
                                   "responses": _answers(ref("HealthList"))}},
        base + "/openapi.json": {"get": {"summary": "This document",
                                         "responses": _answers(ref("OpenAPI"))}},
    }


def document():
    """The whole OpenAPI 3.1 document (a new dict each call)."""
    paths = {}
    for name, schema, kind in RESOURCES:
        paths.update(resource_paths(name, schema, kind))
    paths.update(plugin_paths())
    paths.update(extension_paths())
    return {
        "openapi": "3.1.0",
        "info": {"title": "gproxy Admin API", "version": __version__,
                 "description": "Apache APISIX 3.x's Admin API for stream routes, upstreams "
                                "and ssls, with gproxy's extensions under /apisix/admin/gproxy/."
                                " Generated from the schemas gproxy checks requests with."},
        "servers": [{"url": "http://127.0.0.1:9080"}],
        "security": [{name: []} for name in SECURITY],
        "paths": paths,
        "components": {"schemas": components(), "securitySchemes": SECURITY},
    }


def text():
    """The document as the file in docs/ holds it."""
    return json.dumps(document(), indent=1, sort_keys=True) + "\n"


if __name__ == "__main__":
    print(text(), end="")
