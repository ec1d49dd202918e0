"""The Admin API against docs/apisix-behaviour.md §3, §4.1, §5.1, §6.

Every request goes through Flask's test client (no sockets) into an app built
by ``create_app`` over a real FileStore in ``tmp_path``.  Expected bodies and
``error_msg`` strings are APISIX's, copied from the spec, never from gproxy.
Each rejected request is also checked to leave the store, in memory and on
disk, byte for byte as it was.
"""

import contextlib
import copy
import json
import logging
import os
import re
import time

import pytest

from gproxy.admin.app import create_app
from gproxy.config import Config
from gproxy.proxy.sessions.live import LiveSessions
from gproxy.proxy.sessions.registry import Registry
from gproxy.store.file import FileStore

ADMIN_KEY = "edd1c9f034335f136f87ad84b625c8f1"
VIEWER_KEY = "4054f7cf07e344346cd3f287985e76a2"
KEY = {"X-API-KEY": ADMIN_KEY}
LOCAL = "127.0.0.1"
SR = "/apisix/admin/stream_routes"
UP = "/apisix/admin/upstreams"
EXT = "/apisix/admin/gproxy"
KEY_PATTERN = (r"^((uri|server_name|server_addr|request_uri|remote_port|remote_addr"
               r"|query_string|host|hostname|mqtt_client_id)|arg_[0-9a-zA-z_-]+)$")

# The plugin doc's three requests (seed 000), bodies exactly as the curl -d sends them.
SEED_ROUNDROBIN = '''
{
"plugins": {
"mqtt-proxy": {
"protocol_name": "MQTT",
"protocol_level": 4
}
},
"upstream": {
"type": "roundrobin",
"nodes": [{
"host": "127.0.0.1",
"port": 1980,
"weight": 1
}]
}
}'''
SEED_CHASH = '''
{
"plugins": {
"mqtt-proxy": {
"protocol_name": "MQTT",
"protocol_level": 4
}
},
"upstream": {
"type": "chash",
"key": "mqtt_client_id",
"nodes": [
{
"host": "127.0.0.1",
"port": 1995,
"weight": 1
},
{
"host": "127.0.0.2",
"port": 1995,
"weight": 1
}
]
}
}'''
MQTT4 = {"mqtt-proxy": {"protocol_name": "MQTT", "protocol_level": 4}}
#: a config file's stream section: without it APISIX (and gproxy) turn stream mode off
STREAM = {"stream_proxy": {"tcp": [9100]}}
UPSTREAM = {"type": "roundrobin", "nodes": {"127.0.0.1:1995": 1}}


class Api:
    """One app over one FileStore; ``call`` sends a request as a local admin."""

    def __init__(self, directory, conf=None):
        self.path = directory / "apisix.yaml"
        self.store = FileStore(self.path)
        self.registry = Registry()
        self.sessions = LiveSessions(self.registry)
        self.app = create_app(self.store, self.sessions, Config(conf))
        self.client = self.app.test_client()

    def call(self, method, url, body=None, headers=KEY, remote=LOCAL):
        data = json.dumps(body) if isinstance(body, (dict, list, int)) else body
        return self.client.open(url, method=method, data=data, headers=headers,
                                environ_base={"REMOTE_ADDR": remote})

    def get(self, url, **kw):
        return self.call("GET", url, **kw)

    def put(self, url, body=None, **kw):
        return self.call("PUT", url, body, **kw)

    def post(self, url, body=None, **kw):
        return self.call("POST", url, body, **kw)

    def patch(self, url, body=None, **kw):
        return self.call("PATCH", url, body, **kw)

    def delete(self, url, **kw):
        return self.call("DELETE", url, **kw)

    def state(self):
        """What a rejected request must not change: the file, its directory, the data."""
        raw = self.path.read_bytes() if self.path.exists() else None
        data = {kind: {r.id: copy.deepcopy(r.value) for r in self.store.list(kind)}
                for kind in ("stream_routes", "upstreams")}
        return raw, sorted(os.listdir(self.path.parent)), data

    @contextlib.contextmanager
    def unchanged(self):
        before = self.state()
        yield
        assert self.state() == before


@pytest.fixture
def api(tmp_path):
    return Api(tmp_path)


@pytest.fixture
def seeded(api):
    """Upstream 1 and stream route 1 (using it) exist, so the file exists too."""
    assert api.put(UP + "/1", UPSTREAM).status_code == 201
    assert api.put(SR + "/1", {"plugins": MQTT4, "upstream_id": 1}).status_code == 201
    return api


def body(resp):
    return json.loads(resp.get_data(as_text=True))


def rejected(api, method, url, payload, status, expected, **kw):
    """Send a request that must fail; check status, exact body and an untouched store."""
    with api.unchanged():
        resp = api.call(method, url, payload, **kw)
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert body(resp) == expected
    return resp


def error(msg):
    return {"error_msg": msg}


# -- the plugin doc's requests, verbatim (seed 000) -----------------------------

def test_seed_doc_requests(api):
    resp = api.put(SR + "/1", SEED_ROUNDROBIN)
    assert resp.status_code == 201
    first = body(resp)
    assert set(first) == {"key", "value"}
    assert first["key"] == "/apisix/stream_routes/1"
    value = first["value"]
    assert isinstance(value["create_time"], int) and isinstance(value["update_time"], int)
    assert value == dict(json.loads(SEED_ROUNDROBIN), id="1",
                         create_time=value["create_time"], update_time=value["create_time"])

    resp = api.put(SR + "/1", SEED_CHASH)
    assert resp.status_code == 200  # replaced an existing key
    second = body(resp)
    assert second["key"] == "/apisix/stream_routes/1"
    assert second["value"]["create_time"] == value["create_time"]
    assert second["value"]["update_time"] >= value["update_time"]
    assert second["value"] == dict(json.loads(SEED_CHASH), id="1",
                                   create_time=value["create_time"],
                                   update_time=second["value"]["update_time"])

    resp = api.delete(SR + "/1")
    assert resp.status_code == 200
    assert body(resp) == {"deleted": "1", "key": "/apisix/stream_routes/1"}
    assert api.store.get("stream_routes", "1") is None

    rejected(api, "DELETE", SR + "/1", None, 404, {"message": "Key not found"})


def test_response_framing(api):
    resp = api.put(SR + "/1", SEED_ROUNDROBIN)
    text = resp.get_data(as_text=True)
    assert text.endswith("}\n") and not text.endswith("\n\n")
    assert resp.mimetype == "application/json"
    assert resp.headers["X-API-VERSION"] == "v3"
    assert resp.headers["Access-Control-Allow-Origin"] == "*"
    assert '"/apisix/stream_routes/1"' in text and "\\/" not in text


def test_error_framing(api):
    resp = rejected(api, "PUT", SR + "/1", None, 400, error("missing configurations"))
    assert resp.get_data(as_text=True).endswith("}\n")
    assert resp.mimetype == "application/json"
    assert resp.headers["X-API-VERSION"] == "v3"
    assert resp.headers["Access-Control-Allow-Origin"] == "*"


def test_head_admin_root(api):
    assert api.call("HEAD", "/apisix/admin").status_code == 200


# -- GET -------------------------------------------------------------------------

def test_get_one(seeded):
    resp = seeded.get(SR + "/1")
    assert resp.status_code == 200
    got = body(resp)
    assert set(got) == {"key", "value", "createdIndex", "modifiedIndex"}
    assert got["key"] == "/apisix/stream_routes/1"
    assert got["value"]["id"] == "1" and got["value"]["upstream_id"] == 1
    assert type(got["createdIndex"]) is int and type(got["modifiedIndex"]) is int
    assert got["modifiedIndex"] >= got["createdIndex"]


def test_replace_keeps_created_index_and_moves_modified_index(seeded):
    before = body(seeded.get(SR + "/1"))
    assert seeded.put(SR + "/1", {"server_port": 9100}).status_code == 200
    after = body(seeded.get(SR + "/1"))
    assert after["createdIndex"] == before["createdIndex"]
    assert after["modifiedIndex"] > before["modifiedIndex"]


def test_get_missing(seeded):
    rejected(seeded, "GET", SR + "/nope", None, 404, {"message": "Key not found"})
    rejected(seeded, "GET", UP + "/nope", None, 404, {"message": "Key not found"})


def test_list(seeded):
    assert seeded.put(SR + "/2", {"server_port": 9100}).status_code == 201
    got = body(seeded.get(SR))
    assert got["total"] == 2 and set(got) == {"list", "total"}
    assert sorted(item["key"] for item in got["list"]) == [
        "/apisix/stream_routes/1", "/apisix/stream_routes/2"]
    for item in got["list"]:
        assert set(item) == {"key", "value", "createdIndex", "modifiedIndex"}
    assert body(seeded.get(UP))["total"] == 1


def test_empty_list(api):
    for url in (SR, UP):
        resp = api.get(url)
        assert resp.status_code == 200
        assert resp.get_data(as_text=True) == '{"list":[],"total":0}\n'


def test_paging(api):
    for n in range(12):  # created in this order; ids do not sort the same way
        assert api.put(SR + "/r%d" % n, {"server_port": 9000 + n}).status_code == 201
    page1 = body(api.get(SR + "?page=1&page_size=10"))
    page2 = body(api.get(SR + "?page=2&page_size=10"))
    assert page1["total"] == page2["total"] == 12
    assert [i["value"]["id"] for i in page1["list"]] == ["r%d" % n for n in range(10)]
    assert [i["value"]["id"] for i in page2["list"]] == ["r10", "r11"]
    assert body(api.get(SR + "?page=3&page_size=10")) == {"list": [], "total": 12}


@pytest.mark.parametrize("size", ["9", "501", "0"])
def test_page_size_out_of_range(api, size):
    with api.unchanged():
        resp = api.get(SR + "?page=1&page_size=" + size)
    assert resp.status_code == 400
    assert resp.get_data(as_text=True) == "page_size must be between 10 and 500"  # plain text


@pytest.mark.parametrize("query", ["?page_size=5", "?page=1&page_size=abc"])
def test_paging_needs_both_numeric_args(seeded, query):
    resp = seeded.get(SR + query)
    assert resp.status_code == 200
    assert body(resp)["total"] == 1 and len(body(resp)["list"]) == 1


def test_name_and_label_filters(api):
    routes = {"a": {"name": "mqtt-a", "labels": {"env": "prod"}},
              "b": {"name": "mqtt-b", "labels": {"team": "iot"}},
              "c": {"name": "other", "labels": {"env": "dev"}}}
    for rid, conf in routes.items():
        assert api.put(SR + "/" + rid, conf).status_code == 201

    def ids(query):
        got = body(api.get(SR + query))
        assert got["total"] == len(got["list"])
        return sorted(item["value"]["id"] for item in got["list"])

    assert ids("?name=mqtt") == ["a", "b"]
    assert ids("?name=^other$") == ["c"]
    assert ids("?label=env") == ["a", "c"]
    assert ids("?name=mqtt&label=env") == ["a"]
    assert ids("?name=nothing") == []
    assert ids("?name=^mqtt-[ab]$") == ["a", "b"]
    assert ids("?name=a|her") == ["a", "c"]
    assert ids("?name=") == ["a", "b", "c"]  # an empty filter filters nothing


def test_name_filter_runs_in_linear_time(api):
    # `(a+)+$` on "aaa...!" backtracks 2^n times in Python's re (and in PCRE
    # without its limit); RE2 answers at once.  256 is the longest name allowed.
    for rid, name in (("long", "a" * 255 + "!"), ("hit", "aaa")):
        assert api.put(UP + "/" + rid, dict(UPSTREAM, name=name)).status_code == 201
    started = time.monotonic()
    got = body(api.get(UP + "?name=(a%2B)%2B$"))
    assert time.monotonic() - started < 0.5
    assert [item["value"]["id"] for item in got["list"]] == ["hit"]


@pytest.mark.parametrize("pattern, reason", [
    ("(", "invalid name filter: missing ): ("),
    ("[a-", "invalid name filter: missing ]: [a-"),
    ("a**", "invalid name filter: bad repetition operator: **"),
    (r"(a)\1", "invalid name filter: invalid escape sequence: \\1"),      # a backreference
    ("(?<=a)b", "invalid name filter: invalid perl operator: (?<="),    # look-behind
    ("x" * 1025, "invalid name filter: longer than 1024 characters"),
])
def test_invalid_name_filter_is_a_400(seeded, pattern, reason):
    for url in (SR, UP):
        with seeded.unchanged():
            resp = seeded.client.get(url, query_string={"name": pattern}, headers=KEY,
                                     environ_base={"REMOTE_ADDR": LOCAL})
        assert resp.status_code == 400
        assert body(resp) == error(reason)


# -- POST and ids ---------------------------------------------------------------

def test_post_generates_20_digit_increasing_ids(api):
    ids = []
    for _ in range(3):
        resp = api.post(SR, {"plugins": MQTT4})
        assert resp.status_code == 201
        got = body(resp)
        new_id = got["value"]["id"]
        assert isinstance(new_id, str) and re.fullmatch(r"\d{20}", new_id)
        assert got["key"] == "/apisix/stream_routes/" + new_id
        assert isinstance(got["value"]["create_time"], int)
        ids.append(new_id)
    assert ids == sorted(ids) and len(set(ids)) == 3
    up = body(api.post(UP, UPSTREAM))["value"]["id"]
    assert re.fullmatch(r"\d{20}", up) and up > ids[-1]


def test_post_never_overwrites_ids_loaded_from_disk(tmp_path):
    (tmp_path / "apisix.yaml").write_text(
        "stream_routes:\n"
        "  - id: \"00000000000000000003\"\n    server_port: 1985\n"
        "  - id: \"00000000000000000004\"\n    server_port: 1986\n"
        "upstreams:\n"
        "  - id: 1\n    nodes:\n      \"127.0.0.1:1995\": 1\n    type: roundrobin\n"
        "#END\n")
    api = Api(tmp_path)
    for _ in range(3):
        resp = api.post(SR, {"server_port": 2000})
        assert resp.status_code == 201
        assert body(resp)["value"]["id"] not in ("00000000000000000003", "00000000000000000004")
    assert api.store.get("stream_routes", "00000000000000000003").value["server_port"] == 1985
    assert api.store.get("stream_routes", "00000000000000000004").value["server_port"] == 1986


def test_put_without_url_id_keeps_body_id_type(api):
    resp = api.put(SR, {"id": 1, "plugins": MQTT4})
    assert resp.status_code == 201
    got = body(resp)
    assert got["key"] == "/apisix/stream_routes/1"
    assert got["value"]["id"] == 1 and type(got["value"]["id"]) is int
    assert body(api.get(SR + "/1"))["value"]["id"] == 1


def test_url_id_wins_as_a_string(api):
    resp = api.put(SR + "/1", {"id": 1, "plugins": MQTT4})  # same id, other type: fine
    assert resp.status_code == 201
    assert body(resp)["value"]["id"] == "1"


# -- stream route errors (§4.1, §6) ---------------------------------------------

@pytest.mark.parametrize("method,url,payload,msg", [
    ("PUT", SR + "/1", None, "missing configurations"),
    ("PUT", SR + "/1", "", "missing configurations"),
    ("POST", SR, None, "missing configurations"),
    ("PUT", SR, {"plugins": MQTT4}, "missing stream route id"),
    ("POST", SR + "/5", {"plugins": MQTT4}, "wrong stream route id, do not need it"),
    ("POST", SR, {"id": 5, "plugins": MQTT4}, "wrong stream route id, do not need it"),
    ("PUT", SR + "/1", {"id": "2"}, "wrong stream route id"),
    ("PUT", SR + "/1", {"id": 2}, "wrong stream route id"),
    ("PUT", SR + "/1", {"create_time": 1}, "the property is forbidden:  create_time"),
    ("PUT", SR + "/1", {"update_time": 1}, "the property is forbidden:  update_time"),
    ("POST", SR, {"create_time": 1}, "the property is forbidden:  create_time"),
    ("PUT", SR + "/1", {"upstream": dict(UPSTREAM, create_time=1)},
     "the property is forbidden:  upstream.create_time"),
    ("PUT", SR + "/1", {"upstream": dict(UPSTREAM, update_time=1)},
     "the property is forbidden:  upstream.update_time"),
    ("PUT", SR + "/1", {"foo": 1},
     "invalid configuration: additional properties forbidden, found foo"),
    ("PUT", SR, {"id": "bad$id"},
     'invalid configuration: property "id" validation failed: '
     "object matches none of the requireds"),
    ("PUT", SR, {"id": 0},
     'invalid configuration: property "id" validation failed: '
     "object matches none of the requireds"),
    ("PUT", SR + "/bad$id", {},
     'invalid configuration: property "id" validation failed: '
     "object matches none of the requireds"),
    ("PUT", SR + "/1", {"server_port": 70000},
     'invalid configuration: property "server_port" validation failed: '
     "expected 70000 to be smaller than 65535"),
    ("PUT", SR + "/1", {"server_port": "9100"},
     'invalid configuration: property "server_port" validation failed: '
     "wrong type: expected integer, got string"),
    ("PUT", SR + "/1", {"remote_addr": ":/8"}, "invalid remote_addr: :/8"),
    ("PUT", SR + "/1", {"server_addr": ":/8"}, "invalid server_addr: :/8"),
    ("PUT", SR + "/1", {"plugins": {"foo": {}}}, "unknown plugin [foo]"),
    ("PUT", SR + "/1", {"plugins": {"mqtt-proxy": 1}},
     "invalid plugin conf 1 for plugin [mqtt-proxy]"),
    ("PUT", SR + "/1", {"plugins": {"mqtt-proxy": {"protocol_name": "MQTT"}}},
     'failed to check the configuration of stream plugin [mqtt-proxy]: '
     'property "protocol_level" is required'),
    ("PUT", SR + "/1", {"plugins": {"mqtt-proxy": {"protocol_level": "4"}}},
     'failed to check the configuration of stream plugin [mqtt-proxy]: '
     'property "protocol_level" validation failed: wrong type: expected integer, got string'),
    ("PUT", SR + "/1", {"upstream_id": 9},
     "failed to fetch upstream info by upstream id [9], response code: 404"),
    ("PATCH", SR + "/1", {"server_port": 1}, "not supported `PATCH` method for stream route"),
    # xRPC (APISIX t/admin/stream-routes.t TEST 16): gproxy registers no protocol
    ("PUT", SR + "/1", {"protocol": {"name": "xxx"}, "upstream": UPSTREAM},
     "unknown protocol [xxx]"),
    ("PUT", SR + "/1", {"protocol": {"name": "pingpong"}}, "unknown protocol [pingpong]"),
    ("POST", SR, {"protocol": {"name": "redis", "conf": {}}}, "unknown protocol [redis]"),
    ("PUT", SR + "/1", {"protocol": {}},
     'invalid configuration: property "protocol" validation failed: '
     'property "name" is required'),
])
def test_stream_route_rejected(seeded, method, url, payload, msg):
    status = 405 if method == "PATCH" else 400
    rejected(seeded, method, url, payload, status, error(msg))


@pytest.mark.parametrize("raw", ["{bad", '{"plugins": }', "[1, 2", "{} x"])
def test_invalid_json_body(seeded, raw):
    with seeded.unchanged():
        resp = seeded.put(SR + "/1", raw)
    assert resp.status_code == 400
    got = body(resp)
    assert set(got) == {"error_msg", "req_body"}
    assert got["error_msg"].startswith("invalid request body: ")
    assert got["req_body"] == raw


@pytest.mark.parametrize("raw, msg", [
    ("[" + ",".join(["{}"] * 300000) + "]", "Found too many values (more than 16384)"),
    ('{"a":' * 5000 + "1" + "}" * 5000, "Found too many nested data structures (more than 64)"),
    ('{"a":' * 65 + "1" + "}" * 65, "Found too many nested data structures (more than 64)"),
    ('{"server_port": %s}' % ("9" * 5000),
     "Exceeds the limit (4300 digits) for integer string conversion: value has 5000 digits"),
])
def test_bodies_too_big_to_decode_on_the_hub_are_400s(seeded, raw, msg):
    """A body of 300,000 values took 50 ms of the hub to decode, deep nesting or a
    5,000-digit number ended in a 500; now each is a 400 and changes nothing."""
    with seeded.unchanged():
        resp = seeded.put(SR + "/1", raw)
    assert resp.status_code == 400
    assert body(resp) == {"error_msg": "invalid request body: " + msg, "req_body": raw}


def test_unknown_resource(api):
    for url in ("/apisix/admin/foo", "/apisix/admin/foo/1"):
        rejected(api, "GET", url, None, 404, error("Unsupported resource type: foo"))
    rejected(api, "PUT", "/apisix/admin/foo/1", {}, 404, error("Unsupported resource type: foo"))


def test_mqtt_proxy_unknown_keys_and_deprecated_upstream_are_stored(api):
    conf = {"protocol_name": "MQTT", "protocol_level": 4, "whatever": [1, 2],
            "upstream": {"host": "127.0.0.1", "port": 1995}}
    resp = api.put(SR + "/1", {"plugins": {"mqtt-proxy": conf}})
    assert resp.status_code == 201
    assert body(resp)["value"]["plugins"]["mqtt-proxy"] == conf
    assert api.store.get("stream_routes", "1").value["plugins"]["mqtt-proxy"] == conf


def test_protocol_name_is_optional_and_not_defaulted_in_storage(api):
    resp = api.put(SR + "/1", {"plugins": {"mqtt-proxy": {"protocol_level": 5}}})
    assert resp.status_code == 201
    assert body(resp)["value"]["plugins"] == {"mqtt-proxy": {"protocol_level": 5}}


def test_route_without_upstream_is_accepted(api):
    resp = api.put(SR + "/1", {"plugins": MQTT4})
    assert resp.status_code == 201
    resp = api.put(SR + "/2", {})
    assert resp.status_code == 201
    assert body(resp)["value"]["id"] == "2"


@pytest.mark.parametrize("inline", [
    {"type": "chash", "nodes": {"127.0.0.1:1995": 1}},                 # no key
    {"type": "chash", "key": "anything", "nodes": {"127.0.0.1:1995": 1}},
    {"type": "roundrobin", "nodes": {"::1:1995": 1}},                  # bare IPv6
])
def test_inline_upstream_gets_only_the_schema_check(api, inline):
    # §4.1: check_upstream_conf is not run for a stream route's inline upstream
    assert api.put(SR + "/1", {"upstream": inline}).status_code == 201


def test_inline_upstream_schema_errors(api):
    rejected(api, "PUT", SR + "/1", {"upstream": {"type": "roundrobin"}}, 400,
             error('invalid configuration: property "upstream" validation failed: '
                   "value should match only one schema, but matches none"))


def test_upstream_id_that_exists(seeded):
    resp = seeded.put(SR + "/2", {"upstream_id": "1", "server_port": 9100})
    assert resp.status_code == 201


STREAM_OFF = error("stream mode is disabled, can not add stream routes")
EVERY_METHOD = [("GET", SR, None), ("GET", SR + "/1", None), ("PUT", SR + "/1", {}),
                ("PUT", SR + "/2", {"plugins": MQTT4}), ("POST", SR, {"plugins": MQTT4}),
                ("DELETE", SR + "/1", None), ("PATCH", SR + "/1", {"desc": "x"}),
                ("GET", SR + "?name=(", None)]


@pytest.mark.parametrize("conf", [
    {"apisix": {"proxy_mode": "http"}},                       # APISIX 3.5+
    {"apisix": dict(STREAM, proxy_mode="http")},              # 3.5+: even with listeners
    {"deployment": {"admin": {"admin_key_required": True}}},  # <= 3.4: no stream_proxy
    {},                                                       # an empty config file
], ids=["proxy_mode-http", "http-with-stream_proxy", "no-stream_proxy", "empty"])
def test_stream_mode_disabled(tmp_path, conf):
    # a route stored while stream mode was on is not served either
    assert Api(tmp_path).put(SR + "/1", {"plugins": MQTT4}).status_code == 201
    api = Api(tmp_path, conf)
    for method, url, payload in EVERY_METHOD:  # any method, before any other check
        rejected(api, method, url, payload, 400, STREAM_OFF)
    assert api.put(UP + "/1", UPSTREAM).status_code == 201  # upstreams still work


@pytest.mark.parametrize("mode", ["stream", "http&stream"])
def test_stream_mode_enabled_by_the_config_file(tmp_path, mode):
    api = Api(tmp_path, {"apisix": dict(STREAM, proxy_mode=mode)})
    assert api.put(SR + "/1", {"plugins": MQTT4}).status_code == 201
    assert body(api.get(SR))["total"] == 1


# -- upstreams (§5.1) -------------------------------------------------------------

def test_upstream_put_get_delete(api):
    resp = api.put(UP + "/1", UPSTREAM)
    assert resp.status_code == 201
    got = body(resp)
    assert got["key"] == "/apisix/upstreams/1"
    assert got["value"] == dict(UPSTREAM, id="1", create_time=got["value"]["create_time"],
                                update_time=got["value"]["update_time"])
    assert body(api.get(UP + "/1"))["value"]["nodes"] == {"127.0.0.1:1995": 1}
    resp = api.delete(UP + "/1")
    assert resp.status_code == 200
    assert body(resp) == {"deleted": "1", "key": "/apisix/upstreams/1"}
    rejected(api, "DELETE", UP + "/1", None, 404, {"message": "Key not found"})


def test_upstream_array_nodes(api):
    nodes = [{"host": "127.0.0.1", "port": 1995, "weight": 1, "priority": 1},
             {"host": "broker.local", "port": 1883, "weight": 0, "metadata": {"a": 1}}]
    resp = api.put(UP + "/1", {"type": "roundrobin", "nodes": nodes})
    assert resp.status_code == 201
    assert body(resp)["value"]["nodes"] == nodes


@pytest.mark.parametrize("conf", [
    {"type": "chash", "key": "mqtt_client_id", "nodes": {"127.0.0.1:1995": 1}},
    {"type": "chash", "key": "remote_addr", "nodes": {"127.0.0.1:1995": 1}},
    {"type": "chash", "key": "arg_x", "nodes": {"127.0.0.1:1995": 1}},
    {"type": "chash", "hash_on": "header", "key": "X-Id", "nodes": {"127.0.0.1:1995": 1}},
    {"nodes": {"[::1]:1995": 1}},
    {"nodes": {"127.0.0.1:1995": 0}, "retries": 0, "timeout": {
        "connect": 1, "send": 2, "read": 3.5}},
])
def test_upstream_accepted(api, conf):
    assert api.put(UP + "/1", conf).status_code == 201


@pytest.mark.parametrize("conf,msg", [
    ({"type": "chash", "nodes": {"127.0.0.1:1995": 1}}, "missing key"),
    ({"type": "chash", "key": "client_id", "nodes": {"127.0.0.1:1995": 1}},
     'invalid configuration: failed to match pattern "%s" with "client_id"' % KEY_PATTERN),
    ({"nodes": {"::1:1995": 1}},
     "invalid configuration: IPv6 address must be enclosed with '[' and ']'"),
    ({"nodes": {"127.0.0.1:70000": 1}}, "invalid port 70000"),
    ({"nodes": {"127.0.0.1:1995": "1"}},
     'invalid configuration: property "nodes" validation failed: '
     "object matches none of the requireds"),
    ({"nodes": {"127.0.0.1:1995": 1}, "timeout": {"connect": 1}},
     'invalid configuration: property "timeout" validation failed: '
     'property "send" is required'),
    ({"nodes": {"127.0.0.1:1995": 1}, "foo": 1},
     "invalid configuration: additional properties forbidden, found foo"),
    ({"nodes": {"127.0.0.1:1995": 1}, "create_time": 1},
     "the property is forbidden:  create_time"),
])
def test_upstream_rejected(seeded, conf, msg):
    rejected(seeded, "PUT", UP + "/2", conf, 400, error(msg))


def test_upstream_id_errors(seeded):
    rejected(seeded, "PUT", UP, UPSTREAM, 400, error("missing upstream id"))
    rejected(seeded, "POST", UP + "/3", UPSTREAM, 400,
             error("wrong upstream id, do not need it"))
    rejected(seeded, "PUT", UP + "/3", dict(UPSTREAM, id=4), 400, error("wrong upstream id"))


def test_upstream_patch_merges(api):
    conf = {"type": "chash", "key": "mqtt_client_id", "desc": "brokers",
            "nodes": {"10.0.0.1:1883": 1, "10.0.0.2:1883": 1}}
    created = body(api.put(UP + "/1", conf))["value"]
    resp = api.patch(UP + "/1", {"desc": None, "retries": 1,
                                 "nodes": {"10.0.0.2:1883": None, "10.0.0.3:1883": 2}})
    assert resp.status_code == 200
    got = body(resp)
    assert got["key"] == "/apisix/upstreams/1"
    value = got["value"]
    assert "desc" not in value                                   # null deletes
    assert value["nodes"] == {"10.0.0.1:1883": 1, "10.0.0.3:1883": 2}  # objects merge
    assert value["retries"] == 1 and value["key"] == "mqtt_client_id"
    assert value["create_time"] == created["create_time"]
    assert value["update_time"] >= created["update_time"]
    assert api.store.get("upstreams", "1").value == value


def test_upstream_patch_replaces_arrays(api):
    api.put(UP + "/1", {"nodes": [{"host": "10.0.0.1", "port": 1883, "weight": 1},
                                  {"host": "10.0.0.2", "port": 1883, "weight": 1}]})
    new = [{"host": "10.0.0.9", "port": 1884, "weight": 3}]
    resp = api.patch(UP + "/1", {"nodes": new})
    assert resp.status_code == 200
    assert body(resp)["value"]["nodes"] == new


def test_upstream_patch_sub_path(api):
    created = body(api.put(UP + "/1", {"type": "roundrobin", "desc": "x",
                                       "nodes": {"10.0.0.1:1883": 1, "10.0.0.2:1883": 1}}))
    resp = api.patch(UP + "/1/nodes", {"10.0.0.7:1883": 5})
    assert resp.status_code == 200
    value = body(resp)["value"]
    assert value["nodes"] == {"10.0.0.7:1883": 5}  # replaced, not merged
    assert value["desc"] == "x"
    assert value["create_time"] == created["value"]["create_time"]
    resp = api.patch(UP + "/1/desc", '"y"')
    assert resp.status_code == 200 and body(resp)["value"]["desc"] == "y"


def test_upstream_patch_errors(seeded):
    rejected(seeded, "PATCH", UP + "/9", {"retries": 1}, 404, {"message": "Key not found"})
    rejected(seeded, "PATCH", UP + "/9/nodes", {"1.1.1.1:1": 1}, 404,
             {"message": "Key not found"})
    # the merged result is checked like a PUT
    rejected(seeded, "PATCH", UP + "/1", {"type": "chash"}, 400, error("missing key"))
    rejected(seeded, "PATCH", UP + "/1", {"nodes": {"::1:80": 1}}, 400,
             error("invalid configuration: IPv6 address must be enclosed with '[' and ']'"))


def test_delete_upstream_in_use(seeded):
    # As asked in the brief.  Note: APISIX's upstream delete_checker only looks at HTTP
    # routes and services (spec §6), so APISIX itself would delete this one.
    rejected(seeded, "DELETE", UP + "/1", None, 400,
             error("can not delete this upstream, route [1] is still using it now"))
    rejected(seeded, "DELETE", UP + "/1?force=false", None, 400,
             error("can not delete this upstream, route [1] is still using it now"))
    resp = seeded.delete(UP + "/1?force=true")
    assert resp.status_code == 200
    assert body(resp) == {"deleted": "1", "key": "/apisix/upstreams/1"}
    assert seeded.store.get("upstreams", "1") is None


def test_delete_upstream_no_longer_in_use(seeded):
    assert seeded.delete(SR + "/1").status_code == 200
    assert seeded.delete(UP + "/1").status_code == 200


# -- auth and allowlist (§6) --------------------------------------------------------

def failed_token(description):
    return {"error_msg": "failed to check token", "description": description}


def test_missing_and_wrong_key(seeded):
    for method, payload in (("GET", None), ("PUT", {"server_port": 1})):
        rejected(seeded, method, SR + "/1", payload, 401, failed_token("missing apikey"),
                 headers={})
        rejected(seeded, method, SR + "/1", payload, 401, failed_token("wrong apikey"),
                 headers={"X-API-KEY": "nope"})
    rejected(seeded, "DELETE", SR + "/1?api_key=nope", None, 401, failed_token("wrong apikey"),
             headers={})


def test_key_as_query_arg_and_cookie(seeded):
    resp = seeded.put(SR + "/2?api_key=" + ADMIN_KEY, {"server_port": 2}, headers={})
    assert resp.status_code == 201
    # the test client owns the Cookie header: set it through its cookie jar
    seeded.client.set_cookie("x_api_key", ADMIN_KEY)
    resp = seeded.put(SR + "/3", {"server_port": 3}, headers={})
    assert resp.status_code == 201
    assert body(seeded.get(SR, headers={}))["total"] == 3
    seeded.client.set_cookie("x_api_key", "nope")
    rejected(seeded, "GET", SR, None, 401, failed_token("wrong apikey"), headers={})


def test_auth_applies_to_every_admin_path(seeded):
    for url in (UP, EXT + "/sessions", EXT + "/stats", "/apisix/admin/plugins/list"):
        assert seeded.get(url, headers={}).status_code == 401


def test_viewer_role(tmp_path):
    keys = [{"name": "admin", "key": ADMIN_KEY, "role": "admin"},
            {"name": "viewer", "key": VIEWER_KEY, "role": "viewer"}]
    api = Api(tmp_path, {"apisix": STREAM, "deployment": {"admin": {"admin_key": keys}}})
    assert api.put(SR + "/1", {"plugins": MQTT4}).status_code == 201
    viewer = {"X-API-KEY": VIEWER_KEY}
    assert api.get(SR + "/1", headers=viewer).status_code == 200
    assert body(api.get(SR, headers=viewer))["total"] == 1
    for method, url, payload in (("PUT", SR + "/2", {}), ("POST", SR, {}),
                                 ("DELETE", SR + "/1", None), ("PATCH", UP + "/1", {})):
        rejected(api, method, url, payload, 401,
                 failed_token("invalid method for role viewer"), headers=viewer)


def test_admin_key_not_required(tmp_path):
    api = Api(tmp_path, {"apisix": STREAM, "deployment": {"admin": {"admin_key_required": False}}})
    assert api.put(SR + "/1", {"plugins": MQTT4}, headers={}).status_code == 201
    assert api.get(SR + "/1", headers={"X-API-KEY": "anything"}).status_code == 200


def test_no_admin_keys_disables_the_check(tmp_path):
    api = Api(tmp_path, {"apisix": STREAM, "deployment": {"admin": {"admin_key": None}}})
    assert api.put(SR + "/1", {}, headers={}).status_code == 201


def test_allow_admin(seeded):
    for method, payload in (("GET", None), ("PUT", {"server_port": 1}), ("DELETE", None)):
        with seeded.unchanged():
            resp = seeded.call(method, SR + "/1", payload, remote="10.1.2.3")
        assert resp.status_code == 403
    assert seeded.get(SR + "/1", remote="127.0.0.9").status_code == 200


def test_allow_admin_configured(tmp_path):
    api = Api(tmp_path, {"apisix": STREAM, "deployment": {"admin": {"allow_admin": ["10.1.0.0/16"]}}})
    assert api.get(SR, remote="10.1.2.3").status_code == 200
    assert api.get(SR, remote="127.0.0.1").status_code == 403


# -- live apply -------------------------------------------------------------------

def test_store_change_callback_runs_before_the_response(api):
    seen = []
    api.store.subscribe(lambda changes: seen.append(sorted(r.id for r in api.store.list("stream_routes"))))
    assert api.put(SR + "/1", {"plugins": MQTT4}).status_code == 201
    assert seen == [["1"]]
    assert api.delete(SR + "/1").status_code == 200
    assert seen == [["1"], []]


def test_rejected_request_does_not_notify(seeded):
    seen = []
    seeded.store.subscribe(lambda changes: seen.append(1))
    seeded.put(SR + "/1", {"foo": 1})
    seeded.delete(UP + "/1")
    seeded.put(SR + "/1", {}, headers={})
    assert seen == []


# -- gproxy extensions: sessions and stats ----------------------------------------

class Closer:
    """A session handle that counts how often it was closed or ended."""

    def __init__(self):
        self.calls = 0
        self.ends = []

    def close(self):
        self.calls += 1

    def end(self, code, grace, server_reference=None):
        self.ends.append((code, grace, server_reference))


def open_session(stack, registry, route_id, client=("10.0.0.5", 50000), **fields):
    info = registry.new_session(client, ("0.0.0.0", 9100))
    info.route_id = route_id
    for name, value in fields.items():
        setattr(info, name, value)
    closer = Closer()
    registry.add(info, closer)
    stack.callback(registry.remove, info)
    return info, closer


def without_now(got):
    now = got.pop("now")
    assert abs(now - time.time()) < 60  # the server's clock, for "connected N s ago"
    assert (got.pop("page"), got.pop("page_size")) == (1, 100)
    return got


def test_sessions_list(api):
    assert without_now(body(api.get(EXT + "/sessions"))) == {"list": [], "total": 0}
    with contextlib.ExitStack() as stack:
        a, _ = open_session(stack, api.registry, "1", client_id="dev-a", node="127.0.0.1:1883")
        b, _ = open_session(stack, api.registry, "2", client=("10.0.0.6", 50001))
        got = body(api.get(EXT + "/sessions"))
        assert got["total"] == 2
        assert [s["id"] for s in got["list"]] == [a.id, b.id]
        first = got["list"][0]
        assert first["client_addr"] == "10.0.0.5" and first["client_port"] == 50000
        assert first["route_id"] == "1" and first["client_id"] == "dev-a"
        assert first["node"] == "127.0.0.1:1883" and first["server_port"] == 9100
    assert without_now(body(api.get(EXT + "/sessions"))) == {"list": [], "total": 0}


def test_close_one_session(api):
    with contextlib.ExitStack() as stack:
        a, close_a = open_session(stack, api.registry, "1")
        b, close_b = open_session(stack, api.registry, "1")
        resp = api.delete(EXT + "/sessions/" + a.id)
        assert resp.status_code == 200
        assert close_a.calls == 1 and close_b.calls == 0
        resp = api.delete(EXT + "/sessions/no-such-id")
        assert resp.status_code == 404
        assert body(resp) == {"message": "Key not found"}
        assert close_b.calls == 0


def test_evict_the_sessions_of_one_route(api):
    with contextlib.ExitStack() as stack:
        a, close_a = open_session(stack, api.registry, "1")
        b, close_b = open_session(stack, api.registry, "2")
        c, close_c = open_session(stack, api.registry, "1")
        resp = api.delete(EXT + "/sessions?route_id=1")
        assert resp.status_code == 200
        job = body(resp)
        assert (job["total"], job["rate"], job["selector"]) == (2, None, {"route_id": "1"})
        assert wait_job(api, job["id"])["done"] == 2
        # a clean end (0x9C use another server), not an abrupt close
        assert (close_a.ends, close_b.ends, close_c.ends) == ([(0x9C, 5.0, None)], [],
                                                              [(0x9C, 5.0, None)])
        assert close_a.calls == close_c.calls == 0
        assert api.delete(EXT + "/sessions").status_code == 400  # no filter nor all
        assert close_b.ends == []
        job = body(api.delete(EXT + "/sessions?all=true"))
        assert wait_job(api, job["id"])["done"] == 3
        assert len(close_b.ends) == 1


def wait_job(api, job_id):
    import gevent
    for _ in range(200):
        job = body(api.get(EXT + "/evictions/" + job_id))
        if job["state"] != "running":
            return job
        gevent.sleep(0.01)
    raise AssertionError("eviction %s still running: %s" % (job_id, job))


def test_closing_needs_an_admin_key(api):
    with contextlib.ExitStack() as stack:
        a, closer = open_session(stack, api.registry, "1")
        assert api.delete(EXT + "/sessions/" + a.id, headers={}).status_code == 401
        assert api.delete(EXT + "/sessions?route_id=1", headers={}).status_code == 401
        assert closer.calls == 0


def test_stats(api):
    reg = api.registry
    with contextlib.ExitStack() as stack:
        done, _ = open_session(stack, reg, "1")
        done.bytes_in, done.bytes_out = 10, 20
    reg.reject("no_route")
    reg.reject("no_route")
    with contextlib.ExitStack() as stack:
        live, _ = open_session(stack, reg, "1", node="127.0.0.1:1883", bytes_in=1, bytes_out=2)
        got = body(api.get(EXT + "/stats"))
        assert got["live_sessions"] == 1
        assert got["sessions_total"] == 2
        assert got["bytes_in"] == 11 and got["bytes_out"] == 22
        assert got["rejected"] == {"no_route": 2}
        assert got["per_node"] == {"127.0.0.1:1883": 1}
        assert isinstance(got["started_at"], (int, float))


# -- plugin metadata endpoints -------------------------------------------------------

def test_plugins_list(api):
    resp = api.get("/apisix/admin/plugins/list?subsystem=stream")
    assert resp.status_code == 200
    assert "mqtt-proxy" in body(resp)


def test_plugin_schema(api):
    resp = api.get("/apisix/admin/plugins/mqtt-proxy?subsystem=stream")
    assert resp.status_code == 200
    schema = body(resp)
    assert schema["type"] == "object"
    assert schema["required"] == ["protocol_level"]
    assert schema["properties"]["protocol_level"]["type"] == "integer"
    assert schema["properties"]["protocol_name"]["type"] == "string"
    assert "additionalProperties" not in schema


def test_plugin_schema_not_found(api):
    resp = api.get("/apisix/admin/plugins/foo?subsystem=stream")
    assert resp.status_code == 404
    assert body(resp) == error("plugin not found in subsystem stream")


def test_a_change_a_worker_could_not_apply_is_a_503_not_a_200(api):
    """With --workers, a change stored but not live in every worker is said so
    (before: the parent logged it and the Admin API answered 200)."""
    from gproxy.errors import NotApplied

    def worker_fails(changes):
        raise NotApplied("the change is stored, but worker 7 failed to apply it: out of "
                         "memory; it serves the previous route table until it takes the "
                         "whole table")

    api.store.subscribe(worker_fails)
    resp = api.put(UP + "/1", UPSTREAM)
    assert resp.status_code == 503
    assert body(resp) == error("the change is stored, but worker 7 failed to apply it: out "
                               "of memory; it serves the previous route table until it takes "
                               "the whole table")
    assert api.store.get("upstreams", "1") is not None  # stored: a retry re-applies it


# -- client text in the log ------------------------------------------------------------

def test_a_path_and_a_store_error_cannot_forge_a_log_line(api, monkeypatch, caplog):
    """The request path is the client's (``%0A`` decodes to a newline), the store
    error etcd's: each is escaped into the one line gproxy writes."""
    from gproxy.errors import StoreUnavailable

    def down(*args):
        raise StoreUnavailable("etcd unavailable\n2026/01/01 00:00:00 [warn] forged by etcd")
    monkeypatch.setattr(api.store, "get", down)
    with caplog.at_level(logging.ERROR):
        resp = api.get(SR + "/1%0A2026-01-01%2000:00:00%20[warn]%20forged%20by%20a%20client")
    assert resp.status_code == 503
    (record,) = [r for r in caplog.records if "in the store" in r.getMessage()]
    line = record.getMessage()
    assert "\n" not in line and "\\x0a2026-01-01 00:00:00 [warn] forged by a client" in line
    assert "\\x0a2026/01/01 00:00:00 [warn] forged by etcd" in line
