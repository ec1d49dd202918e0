"""One Admin API blueprint per APISIX resource (stream_routes, upstreams, ssls).

Mirrors APISIX 3.x ``apisix/admin/resource.lua``: the order of checks in
``check_conf`` (missing body, ids, forbidden timestamps, schema and the
resource's own rules), the envelopes (``{"key","value"}``, ``{"list","total"}``,
``{"deleted":"1"}``), and the status codes.  A failed check raises ApiError
before the store is touched, so a bad request changes nothing.  An ssl
object's private keys (``key``, ``keys``) are never in an answer: APISIX
drops them from GET bodies, and gproxy from every body.
"""

import copy
import json
import operator
import time

from flask import Blueprint, Response, request

from gproxy import hub
from gproxy.admin.filters import FilterError, ListFilter
from gproxy.errors import SchemaError
from gproxy.model import jsontext
from gproxy.model.mqttproxy import split_upstream_ids
from gproxy.model.resources import check_stream_route, check_upstream
from gproxy.model.ssls import check_ssl, without_secrets

KIND = {"stream_routes": "stream route", "upstreams": "upstream", "ssls": "ssl"}
_BY_ID = operator.attrgetter("id")


class ApiError(Exception):
    """An Admin API error: ``body`` is sent as JSON with ``status``."""

    def __init__(self, message, status=400, **extra):
        super().__init__(message)
        self.status = status
        self.body = dict({"error_msg": message}, **extra)


def json_response(body, status=200):
    """APISIX's body: the JSON (``/`` not escaped) and a trailing newline.  A long
    ``list`` (10,000 routes: 3 MB) is encoded in parts, pausing between them."""
    options = {"ensure_ascii": False, "separators": (",", ":")}
    raw = body.get("req_body") if isinstance(body, dict) else None
    if isinstance(raw, str) and len(raw) > 65536:  # a refused body echoed back, as APISIX does
        head = json.dumps(dict(body, req_body=None), **options)
        text = head[:-len("null}")] + jsontext.dumps_string(raw, hub.pause, **options) + "}"
    else:
        text = jsontext.dumps_long(body, hub.pause, **options)
    return Response(text + "\n", status=status, mimetype="application/json")


def page_size_refused(size):
    """APISIX's bounds on ``page_size`` and its plain-text 400; None when ``size`` is fine."""
    if 10 <= size <= 500:
        return None
    return Response("page_size must be between 10 and 500", 400, mimetype="text/plain")


def read_body():
    """The request's JSON body (None when empty), decoded within ``jsontext``'s
    bounds; a body that is not JSON, or too big to decode on the hub, is a 400."""
    raw = request.get_data(as_text=True)
    hub.pause()
    if not raw.strip():
        return None
    try:
        return jsontext.loads(raw, pause=hub.pause)
    except jsontext.JsonError as exc:
        raise ApiError("invalid request body: %s" % exc, req_body=raw) from None


def _forbid_timestamps(conf, prefix=""):
    for key in ("create_time", "update_time"):
        if key in conf:
            raise ApiError("the property is forbidden:  %s%s" % (prefix, key))
    if not prefix and isinstance(conf.get("upstream"), dict):
        _forbid_timestamps(conf["upstream"], "upstream.")


def _shown(kind, value):
    return without_secrets(value) if kind == "ssls" else value


def _record(rec):
    return {"key": rec.key, "value": _shown(rec.kind, rec.value),
            "createdIndex": rec.created_index, "modifiedIndex": rec.modified_index}


class Resource:
    """Checks and store operations for one resource name."""

    def __init__(self, name, store):
        self.name = name
        self.kind = KIND[name]
        self.store = store

    def check_conf(self, id_, conf, need_id, allow_time=False):
        """APISIX's ``check_conf``: returns the id to write under."""
        if conf is None:
            raise ApiError("missing configurations")
        if isinstance(conf, dict):
            id_ = id_ if id_ is not None else conf.get("id")
            if need_id and id_ in (None, ""):
                raise ApiError("missing %s id" % self.kind)
            if not need_id and id_ is not None:
                raise ApiError("wrong %s id, do not need it" % self.kind)
            if need_id and conf.get("id") is not None and str(conf["id"]) != str(id_):
                raise ApiError("wrong %s id" % self.kind)
            if id_ is not None:
                conf["id"] = id_
            if not allow_time:
                _forbid_timestamps(conf)
        try:
            if isinstance(conf, dict):  # APISIX decrypts a key given encrypted to check it
                conf.update(self.store.open(self.name, conf))
            if self.name == "upstreams":
                check_upstream(conf, hub.pause)
            elif self.name == "ssls":
                check_ssl(conf, hub.pause)
            else:
                check_stream_route(conf, lambda uid: self.store.get("upstreams", uid) is not None,
                                   hub.pause)
        except SchemaError as exc:
            raise ApiError(str(exc)) from None
        return id_

    def write(self, id_, conf, status_new=201):
        now = int(time.time())
        old = self.store.get(self.name, id_)
        conf["create_time"] = old.value.get("create_time", now) if old else now
        conf["update_time"] = now
        record, created = self.store.put(self.name, str(id_), conf)
        return json_response({"key": record.key, "value": _shown(self.name, record.value)},
                     status_new if created else 200)

    def list(self):
        try:
            keep = ListFilter(request.args)
        except FilterError as exc:
            raise ApiError(str(exc)) from None
        records = sorted(self.store.list(self.name), key=_BY_ID)  # the keys share a prefix
        hub.pause()
        records = keep.apply(records)
        try:  # like APISIX's v3 adapter: page only when both are numbers
            page, size = int(request.args["page"]), int(request.args["page_size"])
        except (KeyError, ValueError):
            page = size = None
        if page is not None:
            refused = page_size_refused(size)
            if refused is not None:
                return refused
            records.sort(key=lambda r: r.created_index)
            total = len(records)
            start = (max(page, 1) - 1) * size
            return json_response({"list": [_record(r) for r in records[start:start + size]],
                          "total": total})
        return json_response({"list": [_record(r) for r in records], "total": len(records)})

    def delete(self, id_):
        if self.name == "upstreams" and request.args.get("force") != "true":
            user = _first_user(self.store.list("stream_routes"), str(id_))
            if user is not None:
                raise ApiError("can not delete this upstream, route [%s] is still using it now"
                               % user)
        removed = self.store.delete(self.name, id_)
        if removed is None:
            return json_response({"message": "Key not found"}, 404)
        return json_response({"deleted": "1", "key": removed.key})

    def patch(self, id_, sub_path):
        conf = read_body()
        if conf is None:
            raise ApiError("missing new configuration")
        if not sub_path and not isinstance(conf, dict):
            raise ApiError("invalid configuration")
        old = self.store.get(self.name, id_)
        if old is None:
            return json_response({"message": "Key not found"}, 404)
        value = copy.deepcopy(old.value)
        if sub_path:
            value = _set_path(value, sub_path, conf)
        else:
            value = merge_patch(value, conf)
        self.check_conf(id_, value, True, allow_time=True)
        return self.write(id_, value, status_new=200)


def _first_user(routes, upstream_id):
    """The first route whose ``upstream_id`` is ``upstream_id``, or whose traffic split
    names it (pausing as it looks)."""
    for n, record in enumerate(routes):
        if (str(record.value.get("upstream_id")) == upstream_id
                or upstream_id in split_upstream_ids(record.value)):
            return record.id
        if n % 256 == 255:
            hub.pause()
    return None


def merge_patch(target, patch):
    """RFC 7386 merge: objects merge recursively, ``null`` deletes, arrays replace."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def _set_path(value, sub_path, conf):
    parts = [p for p in sub_path.split("/") if p]
    node = value
    for part in parts[:-1]:
        if not isinstance(node, dict) or not isinstance(node.get(part), dict):
            raise ApiError("invalid sub path: %s" % sub_path)
        node = node[part]
    if not isinstance(node, dict):
        raise ApiError("invalid sub path: %s" % sub_path)
    node[parts[-1]] = conf
    return value


def make_resource_blueprint(name, store, enabled=True):
    res = Resource(name, store)
    bp = Blueprint(name, __name__, url_prefix="/apisix/admin/" + name)

    @bp.before_request
    def stream_mode():
        if not enabled:
            raise ApiError("stream mode is disabled, can not add stream routes")

    @bp.get("", strict_slashes=False)
    def list_():
        return res.list()

    @bp.get("/<id_>")
    def get(id_):
        rec = store.get(name, id_)
        if rec is None:
            return json_response({"message": "Key not found"}, 404)
        return json_response(_record(rec))

    @bp.put("", strict_slashes=False)
    @bp.put("/<id_>")
    def put(id_=None):
        conf = read_body()
        id_ = res.check_conf(id_, conf, need_id=True)
        return res.write(id_, conf)

    @bp.post("", strict_slashes=False)
    @bp.post("/<id_>")
    def post(id_=None):
        conf = read_body()
        res.check_conf(id_, conf, need_id=False)
        new_id = store.new_id()
        conf["id"] = new_id
        return res.write(new_id, conf)

    @bp.delete("", strict_slashes=False)
    @bp.delete("/<id_>")
    def delete(id_=None):
        if id_ is None:
            raise ApiError("missing %s id" % res.kind)
        return res.delete(id_)

    @bp.patch("", strict_slashes=False)
    @bp.patch("/<id_>")
    @bp.patch("/<id_>/<path:sub_path>")
    def patch(id_=None, sub_path=None):
        if name == "stream_routes":
            resp = json_response({"error_msg": "not supported `PATCH` method for stream route"},
                                 405)
            resp.headers["Allow"] = "GET, PUT, POST, DELETE"  # RFC 9110 §15.5.6
            return resp
        if id_ is None:
            raise ApiError("missing %s id" % res.kind)
        return res.patch(id_, sub_path)

    return bp
