"""gproxy's own Admin API extensions under ``/apisix/admin/gproxy/``.

Live sessions, totals, and disconnect, read from whatever ``sessions`` object
the runtime hands over (one process's registry, or the workers' merged view):
it offers ``snapshot()``, ``stats()``, ``close(id)`` and ``close_where(route_id)``.
Key-protected like the rest of the Admin API.
"""

import time

from flask import Blueprint, request

from gproxy.admin.resources import ApiError, json_response


def extensions_blueprint(prefix, sessions):
    bp = Blueprint("gproxy_ext", __name__, url_prefix=prefix + "/gproxy")

    @bp.get("/sessions")
    def list_sessions():
        items = sessions.snapshot()
        return json_response({"list": items, "total": len(items), "now": time.time()})

    @bp.get("/stats")
    def stats():
        return json_response(sessions.stats())

    @bp.delete("/sessions/<session_id>")
    def close_session(session_id):
        if not sessions.close(session_id):
            return json_response({"message": "Key not found"}, 404)
        return json_response({"closed": [session_id]})

    @bp.delete("/sessions")
    def close_sessions():
        route_id = request.args.get("route_id")
        if route_id is None and request.args.get("all") != "true":
            raise ApiError("give route_id=<id> or all=true")
        return json_response({"closed": sessions.close_where(route_id)})

    return bp


def health_blueprint(prefix, health):
    """``GET /apisix/admin/gproxy/health``: the health checkers, as the control API
    lists them (``health()``), for the dashboard, which talks to the Admin API only."""
    bp = Blueprint("gproxy_health", __name__, url_prefix=prefix + "/gproxy")

    @bp.get("/health")
    def health_list():
        items = health()
        return json_response({"list": items, "total": len(items)})

    return bp
