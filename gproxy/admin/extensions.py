"""gproxy's own Admin API extensions under ``/apisix/admin/gproxy/``.

Live sessions (one page at a time, filtered and sorted where they are kept),
totals from the registry's counters, disconnect, evictions (clean ends at a
rate, with a job to follow), and the Admin API's OpenAPI document (built
once, with the app, from the schemas the checks use: ``openapi``).  Everything is read from and done through
the ``sessions`` object the runtime hands over (one process's
``LiveSessions`` or the workers' merged view): ``query(spec)``,
``stats()``, ``close(id)``, ``evictions.start(spec, rate)`` /
``get(id)`` / ``cancel(id)``; a bad filter raises ValueError.  Paging takes
APISIX's ``page`` and ``page_size`` with the same bounds and plain-text 400
(docs/apisix-behaviour.md §6).  Key-protected like the rest of the Admin API.

``fleet=true`` (and ``/gproxy/instances``) go to the ``fleet`` object
instead (``gproxy.fleet``: ``instances(token)``, ``query(spec, token)``,
``evict(spec, rate)``, ``eviction(id)``, ``evictions()``, ``cancel(id)``),
which asks the other instances with the caller's own key.  Without one
(an app built without the runtime) such a request is answered for this
instance, with a note.
"""

import time

from flask import Blueprint, Response, request

from gproxy.admin import openapi
from gproxy.admin.auth import request_token
from gproxy.admin.resources import ApiError, json_response, page_size_refused

DEFAULT_PAGE_SIZE = 100
FILTERS = ("route_id", "node", "client_id", "client_addr", "state")
SELECT_HINT = ("give a filter (route_id, node, client_id, client_addr, state, "
               "misplaced=true), ids=<id,id,...> or all=true")
NO_FLEET = "no fleet here: this answer covers this instance only"


def _fleet_wide():
    return request.args.get("fleet") == "true"


def _int(name, default):
    try:
        return int(request.args[name])
    except (KeyError, ValueError):
        return default


def _spec():
    """The filters of this request as a query spec (see LiveSessions)."""
    spec = {name: request.args[name] for name in FILTERS if request.args.get(name)}
    if request.args.get("misplaced") == "true":
        spec["misplaced"] = True
    if request.args.get("ids"):
        spec["ids"] = [sid for sid in request.args["ids"].split(",") if sid]
    return spec


def _rate():
    text = request.args.get("rate")
    if text is None or text == "":
        return None
    try:
        rate = float(text)
    except ValueError:
        rate = 0
    if not rate > 0 or rate == float("inf"):
        raise ApiError("invalid rate: %s, expect a number of sessions per second > 0" % text)
    return rate


def extensions_blueprint(prefix, sessions, fleet=None):
    bp = Blueprint("gproxy_ext", __name__, url_prefix=prefix + "/gproxy")

    def run(call, *args):
        try:
            return call(*args)
        except ValueError as exc:
            raise ApiError(str(exc)) from None

    @bp.get("/sessions")
    def list_sessions():
        page, size = max(_int("page", 1), 1), _int("page_size", DEFAULT_PAGE_SIZE)
        refused = page_size_refused(size)
        if refused is not None:
            return refused
        spec = dict(_spec(), sort=request.args.get("sort") or "connected_at",
                    offset=(page - 1) * size, limit=size)
        if not _fleet_wide():
            found = run(sessions.query, spec)
        elif fleet is None:
            found = dict(run(sessions.query, spec), note=NO_FLEET)
        else:
            found = run(fleet.query, spec, request_token())
        return json_response(dict(found, page=page, page_size=size, now=time.time()))

    @bp.get("/instances")
    def instances():
        if fleet is None:
            stats = sessions.stats()
            me = {"id": None, "self": True, "live_sessions": stats.get("live_sessions", 0),
                  "per_node": stats.get("per_node") or {}}
            return json_response({"list": [me], "total": 1, "per_node": me["per_node"],
                                  "unreachable": [], "note": NO_FLEET})
        return json_response(fleet.instances(request_token()))

    @bp.get("/stats")
    def stats():
        return json_response(sessions.stats())

    document = openapi.text()  # built here, before serving: ~5 ms the hub never waits on

    @bp.get("/openapi.json")
    def openapi_document():
        return Response(document, mimetype="application/json")

    @bp.delete("/sessions/<session_id>")
    def close_session(session_id):
        if not sessions.close(session_id):
            return json_response({"message": "Key not found"}, 404)
        return json_response({"closed": [session_id]})

    @bp.delete("/sessions")
    def evict_sessions():
        spec = _spec()
        if not spec and request.args.get("all") != "true":
            raise ApiError(SELECT_HINT)
        rate = _rate()
        if _fleet_wide() and fleet is not None:
            return json_response(run(fleet.evict, spec, rate))
        job = run(sessions.evictions.start, spec, rate).as_dict()
        return json_response(dict(job, note=NO_FLEET) if _fleet_wide() else job)

    @bp.get("/evictions")
    def list_evictions():
        jobs = [job.as_dict() for job in sessions.evictions.jobs.values()]
        jobs += fleet.evictions() if fleet is not None else []
        return json_response({"list": jobs, "total": len(jobs)})

    def local_or_fleet(job_id, local, fleet_call):
        job = local(job_id)
        if job is not None:
            return json_response(job.as_dict())
        found = fleet_call(job_id) if fleet is not None else None
        if found is None:
            return json_response({"message": "Key not found"}, 404)
        return json_response(found)

    @bp.get("/evictions/<job_id>")
    def get_eviction(job_id):
        return local_or_fleet(job_id, sessions.evictions.get,
                              fleet.eviction if fleet is not None else None)

    @bp.delete("/evictions/<job_id>")
    def cancel_eviction(job_id):
        return local_or_fleet(job_id, sessions.evictions.cancel,
                              fleet.cancel if fleet is not None else None)

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
