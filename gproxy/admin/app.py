"""The APISIX-compatible Admin API: ``create_app(store, sessions, cfg)``.

Serves ``/apisix/admin/stream_routes``, ``/upstreams`` and ``/ssls`` with
APISIX 3.x's wire format, status codes and error bodies
(docs/apisix-behaviour.md §6), plus gproxy's own key-protected extensions
under ``/apisix/admin/gproxy/`` (live sessions, totals, disconnect).
Every write goes through the store, whose change callback swaps the route
table before the response is sent.  Knows nothing about sockets.
"""

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from gproxy import __version__
from gproxy.admin import auth
from gproxy.errors import NotApplied, StoreUnavailable
from gproxy.protocols.text import printable
from gproxy.admin.extensions import extensions_blueprint
from gproxy.admin.plugins import plugins_blueprint
from gproxy.admin.resources import ApiError, json_response, make_resource_blueprint

PREFIX = "/apisix/admin"
API_VERSION = "v3"
MAX_BODY = 1024 * 1024
RESOURCES = ("stream_routes", "upstreams", "ssls", "plugins", "gproxy")
CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, PUT, POST, PATCH, DELETE, OPTIONS",
    "Access-Control-Allow-Headers": "X-API-KEY, Content-Type",
    "Access-Control-Max-Age": "3600",
}


def create_app(store, sessions, cfg, extra_blueprints=(), fleet=None):
    """The admin Flask app. ``extra_blueprints`` lets the dashboard plug in; ``fleet``
    answers ``fleet=true`` and ``/gproxy/instances`` (``gproxy.fleet``)."""
    app = Flask("gproxy.admin")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    app.register_blueprint(make_resource_blueprint("stream_routes", store, cfg.stream_enabled))
    app.register_blueprint(make_resource_blueprint("upstreams", store, True))
    app.register_blueprint(make_resource_blueprint("ssls", store, True))
    app.register_blueprint(plugins_blueprint(PREFIX))
    app.register_blueprint(extensions_blueprint(PREFIX, sessions, fleet))
    for bp in extra_blueprints:
        app.register_blueprint(bp)

    @app.before_request
    def guard():
        if not request.path.startswith(PREFIX):
            return None  # the dashboard's pages; its API calls come back through here
        if not auth.client_allowed(cfg):
            return auth.forbidden()
        if request.method == "OPTIONS":
            return Response(status=200)
        if request.method == "HEAD" and request.path.rstrip("/") == PREFIX:
            return Response(status=200)
        return auth.check_token(cfg)

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

    @app.errorhandler(StoreUnavailable)
    def store_unavailable(exc):
        # APISIX: 503 {"error_msg": <etcd client error>}, e.g. when etcd is down
        # the path is the client's (decoded: %0A is a newline), etcd's error text etcd's
        app.logger.error("failed to %s %s in the store: %s", printable(request.method),
                         printable(request.path), printable(str(exc)))
        return json_response({"error_msg": str(exc)}, 503)

    @app.errorhandler(NotApplied)
    def not_applied(exc):
        # stored, but a worker serves the previous table: never a silent 200
        app.logger.error("%s %s: %s", request.method, request.path, exc)
        return json_response({"error_msg": str(exc)}, 503)

    @app.errorhandler(HTTPException)
    def http_error(exc):
        if exc.code == 404 and request.path.startswith(PREFIX + "/"):
            segment = request.path[len(PREFIX) + 1:].split("/")[0]
            if segment and segment not in RESOURCES:
                return json_response({"error_msg": "Unsupported resource type: %s" % segment},
                                     404)
        resp = json_response({"error_msg": "%d %s" % (exc.code, exc.name)}, exc.code)
        allow = dict(exc.get_headers()).get("Allow")
        if allow:  # a 405 names the methods the resource has (RFC 9110 §15.5.6)
            resp.headers["Allow"] = allow
        return resp

    return app
