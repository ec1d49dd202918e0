"""The APISIX-compatible Admin API: ``create_app(store, registry, cfg)``.

Serves ``/apisix/admin/stream_routes`` and ``/apisix/admin/upstreams`` with
APISIX 3.x's wire format, status codes and error bodies
(docs/apisix-behaviour.md §6), plus gproxy's own key-protected extensions
under ``/apisix/admin/gproxy/`` (live sessions, totals, disconnect).
Every write goes through the store, whose change callback swaps the route
table before the response is sent.  Knows nothing about sockets.
"""

import ipaddress
import time

from flask import Blueprint, Flask, Response, request
from werkzeug.exceptions import HTTPException

from gproxy import __version__
from gproxy.admin_resources import ApiError, json_response, make_resource_blueprint
from gproxy.resources import MQTT_PROXY_SCHEMA, STREAM_PLUGINS

PREFIX = "/apisix/admin"
API_VERSION = "v3"
MAX_BODY = 1024 * 1024
CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, PUT, POST, PATCH, DELETE, OPTIONS",
    "Access-Control-Allow-Headers": "X-API-KEY, Content-Type",
    "Access-Control-Max-Age": "3600",
}


def _token():
    return (request.args.get("api_key") or request.headers.get("X-API-KEY")
            or request.cookies.get("x_api_key"))


def _check_auth(cfg):
    """None if the request may go on, else the 401 response (APISIX wording)."""
    keys = cfg["deployment.admin.admin_key"]
    if not cfg["deployment.admin.admin_key_required"] or not keys:
        return None
    token = _token()
    if not token:
        return json_response({"error_msg": "failed to check token",
                              "description": "missing apikey"}, 401)
    role = next((k.get("role", "admin") for k in keys if k["key"] == token), None)
    if role is None:
        return json_response({"error_msg": "failed to check token",
                              "description": "wrong apikey"}, 401)
    if role == "viewer" and request.method not in ("GET", "HEAD", "OPTIONS"):
        return json_response({"error_msg": "failed to check token",
                              "description": "invalid method for role viewer"}, 401)
    return None


def _allowed(cfg):
    try:
        addr = ipaddress.ip_address(request.remote_addr or "")
    except ValueError:
        return False
    if getattr(addr, "ipv4_mapped", None):
        addr = addr.ipv4_mapped
    return any(addr.version == net.version and addr in net
               for net in cfg["deployment.admin.allow_admin"])


def _extensions_blueprint(registry):
    bp = Blueprint("gproxy_ext", __name__, url_prefix=PREFIX + "/gproxy")

    @bp.get("/sessions")
    def list_sessions():
        items = registry.snapshot()
        return json_response({"list": items, "total": len(items), "now": time.time()})

    @bp.get("/stats")
    def stats():
        return json_response(registry.stats())

    @bp.delete("/sessions/<session_id>")
    def close_session(session_id):
        if not registry.close(session_id):
            return json_response({"message": "Key not found"}, 404)
        return json_response({"closed": [session_id]})

    @bp.delete("/sessions")
    def close_sessions():
        route_id = request.args.get("route_id")
        if route_id is None and request.args.get("all") != "true":
            raise ApiError("give route_id=<id> or all=true")
        return json_response({"closed": registry.close_where(route_id)})

    return bp


def _plugins_blueprint():
    bp = Blueprint("plugins", __name__, url_prefix=PREFIX + "/plugins")

    @bp.get("/list")
    def plugin_list():
        return json_response(sorted(STREAM_PLUGINS))

    @bp.get("/<name>")
    def plugin_schema(name):
        if request.args.get("subsystem") != "stream" or name not in STREAM_PLUGINS:
            return json_response({"error_msg": "plugin not found in subsystem %s"
                                  % request.args.get("subsystem", "http")}, 404)
        schema = dict(MQTT_PROXY_SCHEMA)
        schema["properties"] = dict(schema["properties"], protocol_name={
            "type": "string", "default": "MQTT"})
        return json_response(schema)

    return bp


def create_app(store, registry, cfg, extra_blueprints=()):
    """The admin Flask app. ``extra_blueprints`` lets the dashboard plug in."""
    app = Flask("gproxy.admin")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    stream_enabled = cfg["apisix.proxy_mode"] != "http"
    app.register_blueprint(make_resource_blueprint("stream_routes", store, stream_enabled))
    app.register_blueprint(make_resource_blueprint("upstreams", store, True))
    app.register_blueprint(_plugins_blueprint())
    app.register_blueprint(_extensions_blueprint(registry))
    for bp in extra_blueprints:
        app.register_blueprint(bp)

    @app.before_request
    def guard():
        if not request.path.startswith(PREFIX):
            return None  # the dashboard's pages; its API calls come back through here
        if not _allowed(cfg):
            return Response("<html><head><title>403 Forbidden</title></head><body>"
                            "<center><h1>403 Forbidden</h1></center></body></html>\n",
                            403, mimetype="text/html")
        if request.method == "OPTIONS":
            return Response(status=200)
        if request.method == "HEAD" and request.path.rstrip("/") == PREFIX:
            return Response(status=200)
        return _check_auth(cfg)

    @app.after_request
    def headers(resp):
        if request.path.startswith(PREFIX):
            resp.headers["X-API-VERSION"] = API_VERSION
            resp.headers["Server"] = "gproxy/" + __version__
            if cfg["deployment.admin.enable_admin_cors"]:
                resp.headers.update(CORS)
        return resp

    @app.errorhandler(ApiError)
    def api_error(exc):
        return json_response(exc.body, exc.status)

    @app.errorhandler(HTTPException)
    def http_error(exc):
        if exc.code == 404 and request.path.startswith(PREFIX + "/"):
            segment = request.path[len(PREFIX) + 1:].split("/")[0]
            if segment and segment not in ("stream_routes", "upstreams", "plugins", "gproxy"):
                return json_response({"error_msg": "Unsupported resource type: %s" % segment},
                                     404)
        return json_response({"error_msg": "%d %s" % (exc.code, exc.name)}, exc.code)

    return app
