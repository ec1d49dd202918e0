"""``gproxy.model.schema`` against an independent oracle: the ``jsonschema`` package.

APISIX's stream route and upstream schemas (``gproxy.model.resources``, from
APISIX's ``schema_def.lua``) are JSON Schema, so python-jsonschema's Draft 7
validator (the draft whose numeric ``exclusiveMinimum`` APISIX uses, as
jsonschema.lua does) can judge the same bodies.  Hypothesis generates route
and upstream bodies that are mostly plausible with some fields wrong: wrong
types, out-of-range ports and weights, bad ids, extra keys, missing or
conflicting required keys, nested garbage.  gproxy's checker must call each
body valid exactly when jsonschema does (only valid/invalid is compared: the
wording is jsonschema.lua's, checked in test_admin_api.py).

The one legitimate difference: gproxy, like Lua, where JSON ``[]`` and ``{}``
both decode to an empty table, accepts ``[]`` where the schema says
``object`` (APISIX users send ``"plugins": []`` and ``"nodes": {}``
interchangeably).  jsonschema does not.  When the two disagree, the test
checks the disagreement is that quirk and nothing else: with ``[]`` no longer
an object, gproxy must agree with jsonschema again.
"""

import copy
from unittest import mock

import pytest
from hypothesis import HealthCheck, Phase, example, find, given, settings
from hypothesis import strategies as st
from jsonschema import Draft7Validator

from gproxy.model import schema
from gproxy.model.resources import STREAM_ROUTE_SCHEMA, UPSTREAM_SCHEMA

# -- JSON values ------------------------------------------------------------------------------

LEAF = (st.none() | st.booleans() | st.integers(-3, 70000)
        | st.floats(allow_nan=False, allow_infinity=False, width=32) | st.text(max_size=6))
ANY = st.recursive(LEAF, lambda inner: st.lists(inner, max_size=3)
                   | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)
OBJECTS = st.dictionaries(st.text(max_size=4), LEAF, max_size=2)


def wrong(*values):
    """Values meant to be wrong for a field (the oracle decides), plus anything at all."""
    return st.one_of(st.sampled_from(values), ANY, st.sampled_from([[], {}, None]))


# Each field: (a strategy of values that should be valid, one of values that should not).
# A body is a valid-looking object with zero, one or two fields then made wrong, so
# most invalid bodies have a single fault and a check gproxy lost would show.
ID = (st.from_regex(r"\A[a-zA-Z0-9._-]{1,64}\Z") | st.integers(1, 10 ** 6),
      wrong("", "bad$id", "x" * 65, "a b", 0, -1, 2.5, True))
TEXT = (st.text(min_size=1, max_size=12), wrong("", "x" * 257, 7))
HOST = (st.sampled_from(["127.0.0.1", "example.com", "*.x.com", "[::1]", "::1", "a-b.c"]),
        wrong("", "a b", "ünï", "host/x", 1))
PORT = (st.integers(1, 65535), wrong(0, 65536, -1, "9100", 1.5, True))
NUMBER = st.integers(1, 10) | st.floats(0.001, 10)
COMMON = {
    "id": ID, "name": TEXT, "desc": (st.text(max_size=12), wrong("x" * 257, 1)),
    "labels": (st.dictionaries(st.text(max_size=4), st.from_regex(r"\A\S{1,8}\Z"), max_size=2),
               wrong({"k": "a b"}, {"k": ""}, {"k": 1}, {"k": "x" * 257}, "env")),
    "create_time": (st.integers(), wrong("1", 1.5)),
    "update_time": (st.integers(), wrong("1", 1.5)),
}
NODE = st.fixed_dictionaries({"host": HOST[0], "weight": st.integers(0, 100)},
                             optional={"port": PORT[0], "priority": st.integers(-5, 5),
                                       "metadata": OBJECTS})
NODES = (st.dictionaries(st.sampled_from(["127.0.0.1:1995", "[::1]:80", "a.com", "x:y"]),
                         st.integers(0, 100), max_size=3) | st.lists(NODE, max_size=3),
         wrong("127.0.0.1:1995", {"127.0.0.1:1": -1}, {"127.0.0.1:1": "1"}, [{"host": "a"}],
               [{"weight": 1}], [{"host": "a", "weight": -1}], [{"host": 1, "weight": 1}],
               [{"host": "a", "weight": 1, "port": 0}], [{"host": "a b", "weight": 1}]))
TIMEOUT = (st.fixed_dictionaries({"connect": NUMBER, "send": NUMBER, "read": NUMBER}),
           wrong({"connect": 1, "send": 1}, {"connect": 0, "send": 1, "read": 1},
                 {"connect": -1, "send": 1, "read": 1}, {"connect": "1", "send": 1, "read": 1}))


def enum(*good, bad=("other", 1)):
    return st.sampled_from(good), wrong(*bad)


UPSTREAM_FIELDS = dict(COMMON, **{
    "nodes": NODES,
    "type": (st.sampled_from(["roundrobin", "chash", "ewma", "least_conn"]), wrong(1, True)),
    "retries": (st.integers(0, 5), wrong(-1, 1.5, "1")),
    "retry_timeout": (st.integers(0, 10) | st.floats(0, 10), wrong(-1, "1")),
    "timeout": TIMEOUT,
    "hash_on": enum("vars", "header", "cookie", "consumer", "vars_combinations", bad=("url",)),
    "key": (st.text(max_size=10), wrong(1)),
    "scheme": enum("tcp", "tls", "udp", "http", "grpc", "kafka", bad=("ftp", "TCP")),
    "discovery_type": (st.text(max_size=5), wrong(1)),
    "discovery_args": (OBJECTS, wrong("x", 1)),
    "pass_host": enum("pass", "node", "rewrite", bad=("keep",)),
    "upstream_host": HOST,
    "service_name": TEXT,
    "tls": (OBJECTS, wrong("x")),
    "keepalive_pool": (OBJECTS, wrong("x")),
    "checks": (OBJECTS, wrong("x")),
})
ADDR = (st.sampled_from(["127.0.0.1", "10.0.0.0/8", "::1", "2001:db8::/32", "fe80::1%eth0"]),
        wrong("256.1.1.1", "1.2.3", "localhost", "", "1.2.3.4/33x", 1))
EXTRA_KEYS = ("foo", "Nodes", "hash", "plugin_config_id")


def bodies(draw, fields, required=(), alternatives=()):
    """A valid-looking object over ``fields``, then zero to two faults: a wrong value,
    an extra key, a required key dropped, or a conflicting alternative added."""
    body = draw(st.fixed_dictionaries(
        {k: fields[k][0] for k in required},
        optional={k: good for k, (good, _) in fields.items() if k not in required}))
    for fault in draw(st.lists(st.sampled_from(sorted(fields) + ["+extra", "-required",
                                                                 "+alternative"]),
                               max_size=2, unique=True)):
        if fault == "+extra":
            body[draw(st.sampled_from(EXTRA_KEYS))] = draw(LEAF)
        elif fault == "-required":
            for key in required:
                body.pop(key, None)
        elif fault == "+alternative":
            body.update(alternatives)
        else:
            body[fault] = draw(fields[fault][1])
    return body


@st.composite
def upstream_bodies(draw):  # no arguments: Hypothesis's repr of it stays short
    return bodies(draw, UPSTREAM_FIELDS, required=("nodes",),
                  alternatives={"service_name": "svc", "discovery_type": "dns"})


UPSTREAMS = upstream_bodies()
ROUTE_FIELDS = dict(COMMON, **{
    "remote_addr": ADDR,
    "server_addr": ADDR,
    "server_port": PORT,
    "sni": HOST,
    "upstream": (UPSTREAMS, UPSTREAMS | wrong("1")),
    "upstream_id": ID,
    "service_id": ID,
    "plugins": (st.dictionaries(st.sampled_from(["mqtt-proxy", "limit-conn"]), OBJECTS,
                                max_size=2), wrong("mqtt-proxy", [1])),
    "protocol": (st.fixed_dictionaries({"name": st.text(max_size=5)},
                                       optional={"superior_id": ID[0], "conf": OBJECTS}),
                 wrong({"name": 1}, "redis", {"conf": {}})),
})
@st.composite
def route_bodies(draw):
    return bodies(draw, ROUTE_FIELDS)


ROUTES = route_bodies()

CASES = {"upstream": (UPSTREAM_SCHEMA, UPSTREAMS),
         "stream_route": (STREAM_ROUTE_SCHEMA, ROUTES)}


# -- the comparison -------------------------------------------------------------------------

def ours(schema_, body):
    return schema.validate(schema_, copy.deepcopy(body)) is None


def theirs(schema_, body):
    return Draft7Validator(schema_).is_valid(body)


def _strict_type(value, name):
    if name == "object":
        return isinstance(value, dict)
    return _lua_type(value, name)


_lua_type = schema._is_type


def ours_without_the_lua_quirk(schema_, body):
    with mock.patch.object(schema, "_is_type", _strict_type):
        return ours(schema_, body)


@pytest.mark.parametrize("kind", CASES)
def test_the_schemas_are_json_schema(kind):
    Draft7Validator.check_schema(CASES[kind][0])


def agree(schema_, body):
    expected = theirs(schema_, body)
    got = ours(schema_, body)
    if got != expected:
        # only the documented quirk may explain it: [] taken for an empty object
        assert got and not expected, "gproxy rejects what jsonschema accepts: %r" % body
        assert ours_without_the_lua_quirk(schema_, body) == expected, body


AGREEMENT = settings(max_examples=400, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])


NODE_1 = {"127.0.0.1:1995": 1}


# Boundaries every run checks, whatever Hypothesis draws.
@example(body={"nodes": NODE_1, "timeout": {"connect": 0, "send": 1, "read": 1}})
@example(body={"nodes": NODE_1, "timeout": {"connect": 0.001, "send": 1, "read": 1}})
@example(body={"nodes": NODE_1, "retries": 0, "retry_timeout": 0})
@example(body={"nodes": {"127.0.0.1:1995": 0}})
@example(body={"nodes": [{"host": "a", "weight": 1, "port": 65535}]})
@example(body={"nodes": [{"host": "a", "weight": 1, "port": 65536}]})
@example(body={"nodes": NODE_1, "service_name": "s", "discovery_type": "dns"})
@example(body={"service_name": "s", "discovery_type": "dns"})
@example(body={"nodes": NODE_1, "name": "x" * 256})
@example(body={"nodes": NODE_1, "name": "x" * 257})
@AGREEMENT
@given(body=UPSTREAMS)
def test_upstreams_gproxy_and_jsonschema_agree_on_valid_and_invalid(body):
    agree(UPSTREAM_SCHEMA, body)


@example(body={"server_port": 1})
@example(body={"server_port": 65535})
@example(body={"server_port": 65536})
@example(body={"server_port": 0})
@example(body={"id": "x" * 64})
@example(body={"id": "x" * 65})
@example(body={"protocol": {"name": "redis", "superior_id": 1}})
@example(body={"upstream": {"nodes": NODE_1, "timeout": {"connect": 0, "send": 1, "read": 1}}})
@AGREEMENT
@given(body=ROUTES)
def test_stream_routes_gproxy_and_jsonschema_agree_on_valid_and_invalid(body):
    agree(STREAM_ROUTE_SCHEMA, body)


@pytest.mark.parametrize("kind", CASES)
@pytest.mark.parametrize("valid", [True, False])
def test_the_generator_reaches_both_outcomes(kind, valid):
    # the agreement test would be empty if every body were valid (or invalid)
    schema_, strategy = CASES[kind]
    found = find(strategy, lambda body: theirs(schema_, body) is valid,
                 settings=settings(max_examples=2000, database=None,
                                   phases=[Phase.generate]))  # no shrinking: any will do
    # jsonschema is strict about [] for an object, so gproxy without the Lua quirk is the
    # one to compare (with it, an invalid body whose one fault is a [] object came out
    # valid: a draw-dependent failure, e.g. {"nodes": [], "discovery_args": []})
    assert ours_without_the_lua_quirk(schema_, found) is valid


def test_the_lua_quirk_is_the_only_difference():
    body = {"nodes": {"127.0.0.1:1": 1}, "timeout": []}
    assert ours(UPSTREAM_SCHEMA, body) and not theirs(UPSTREAM_SCHEMA, body)
    assert not ours_without_the_lua_quirk(UPSTREAM_SCHEMA, body)
