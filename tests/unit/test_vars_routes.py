"""Routes chosen by the CONNECT (docs/routing.md): the route table's order, the
Admin API's checks of ``vars``/``priority``/``traffic_split``, and the split's
hash (pure, no sockets)."""

import hashlib

import pytest

from gproxy.model.routes import RouteTable
from gproxy.model.split import Split, point
from tests.unit.test_admin_api import SR, UP, UPSTREAM, api, body, error, rejected, seeded  # noqa: F401 (fixtures)

NODE = {"type": "roundrobin", "nodes": [{"host": "127.0.0.1", "port": 1883, "weight": 1}]}


def route(rid, vars_=None, priority=None, level=4, **extra):
    conf = {"protocol_level": level}
    if vars_ is not None:
        conf["vars"] = vars_
    if priority is not None:
        conf["priority"] = priority
    return dict({"id": rid, "plugins": {"mqtt-proxy": conf}, "upstream": NODE}, **extra)


def values(**kw):
    base = {"remote_addr": b"127.0.0.1", "server_addr": b"127.0.0.1", "server_port": b"9100"}
    base.update({k: (v.encode() if isinstance(v, str) else v) for k, v in kw.items()})
    return base


def refined(tbl, sni=None, remote="127.0.0.1", port=9100, **kw):
    if sni is not None:
        kw.setdefault("sni", sni)
    found = tbl.refine("127.0.0.1", port, remote, sni, values(**kw))
    return None if found is None else found.id


TENANTS = RouteTable([
    route("default"),
    route("a", [["mqtt_username", "==", "tenant-a"]]),
    route("b", [["mqtt_client_id", "~~", "^b-[0-9]+$"]]),
    route("vip", [["mqtt_username", "==", "tenant-a"], ["mqtt_client_id", "~~", "^vip"]],
          priority=10),
])


def test_the_match_names_the_first_candidate_and_the_refine_the_route():
    first = TENANTS.match("127.0.0.1", 9100, "127.0.0.1")
    assert first.id == "vip" and first.vars is not None  # highest priority first
    assert refined(TENANTS, mqtt_username="tenant-a", mqtt_client_id="vip-1") == "vip"
    assert refined(TENANTS, mqtt_username="tenant-a", mqtt_client_id="x") == "a"
    assert refined(TENANTS, mqtt_client_id="b-17") == "b"
    assert refined(TENANTS, mqtt_client_id="b-17x") == "default"  # the fallback
    assert refined(TENANTS) == "default"


def test_ties_go_by_id_numbers_first_and_in_numeric_order():
    any_ = [["mqtt_protocol_level", "==", 4]]
    tbl = RouteTable([route("b", any_), route("10", any_), route("9", any_), route("a", any_)])
    assert [r.id for r in tbl._refined.ordered] == ["9", "10", "a", "b"]
    assert refined(tbl, mqtt_protocol_level="4") == "9"
    tbl = RouteTable([route("b", any_), route("10", any_, priority=-1), route("a", any_, 3)])
    assert [r.id for r in tbl._refined.ordered] == ["a", "b", "10"]


def test_no_route_passing_and_no_fallback_is_no_route():
    tbl = RouteTable([route("a", [["mqtt_username", "==", "a"]])])
    assert tbl.match("127.0.0.1", 9100, "127.0.0.1").id == "a"
    assert refined(tbl, mqtt_username="b") is None


def test_address_filters_still_apply_to_routes_with_vars():
    tbl = RouteTable([route("a", [["mqtt_username", "==", "a"]], server_port=1883),
                      route("plain", server_port=9100)])
    first = tbl.match("127.0.0.1", 9100, "127.0.0.1")
    assert first.id == "plain" and first.vars is None  # decided before any byte
    assert refined(tbl, port=1883, mqtt_username="a") == "a"
    assert refined(tbl, port=1883, mqtt_username="b") is None


def test_sni_routes_with_vars_need_their_sni_and_fallbacks_keep_apisix_order():
    tbl = RouteTable([route("plain"), route("sni-fallback", sni="*.example"),
                      route("sni-vars", [["mqtt_username", "==", "a"]], sni="a.example")])
    assert refined(tbl, mqtt_username="a") == "plain"  # no SNI: the sni route never passes
    assert refined(tbl, sni="a.example", mqtt_username="a") == "sni-vars"
    assert refined(tbl, sni="a.example", mqtt_username="b") == "sni-fallback"
    assert refined(tbl, sni="other.test", mqtt_username="a") == "plain"


def test_a_table_without_vars_matches_as_apisix():
    tbl = RouteTable([route("1", server_port=1), route("2"), route("3")])
    assert tbl.match("127.0.0.1", 9100, "127.0.0.1").id == "2"
    assert tbl._first == []
    assert RouteTable([route("1", [])]).match("127.0.0.1", 9100, "127.0.0.1").vars is None


def test_vars_over_every_connection_variable():
    rule = [["sni", "==", "x.example"], ["tls_client_cn", "==", "dev-1"],
            ["remote_addr", "ipmatch", "127.0.0.0/8"], ["server_port", ">=", 9000],
            ["server_addr", "==", "127.0.0.1"], ["mqtt_protocol_name", "==", "MQTT"],
            ["mqtt_protocol_level", "==", 5]]
    tbl = RouteTable([route("all", rule)])
    ok = dict(sni=b"x.example", tls_client_cn=b"dev-1", mqtt_protocol_name=b"MQTT",
              mqtt_protocol_level=b"5")
    assert refined(tbl, **ok) == "all"
    for name in ok:
        assert refined(tbl, **dict(ok, **{name: b"other"})) is None


# -- the split's hash -----------------------------------------------------------------

def test_the_hash_is_the_documented_blake2b():
    want = int.from_bytes(hashlib.blake2b(b"salt\0dev-1", digest_size=8,
                                          person=b"gproxy-split").digest(), "big")
    assert point(b"salt", b"dev-1") == want


def test_sides_follow_the_weights_in_list_order():
    split = Split({"weighted_upstreams": [{"upstream_id": "new", "weight": 1},
                                           {"weight": 3}]})
    ids = [b"dev-%d" % i for i in range(4000)]
    sides = [split.side(k) for k in ids]
    assert 0.22 < sides.count("new") / len(ids) < 0.28
    assert set(sides) == {"new", None}
    for key, side in zip(ids, sides):  # the side is a threshold on h / 2**64
        assert (side == "new") == (point(b"", key) / 2 ** 64 < 0.25)


def test_all_zero_weights_send_everyone_to_the_route_upstream():
    split = Split({"weighted_upstreams": [{"upstream_id": "new", "weight": 0}, {"weight": 0}]})
    assert split.side(b"x") is None and split.choose(b"x", lambda _: True) == (None, False)


def test_choose_fails_over_in_list_order_skipping_empty_sides():
    split = Split({"weighted_upstreams": [{"upstream_id": "a", "weight": 1},
                                           {"upstream_id": "zero", "weight": 0},
                                           {"upstream_id": "b", "weight": 1}]})
    key = next(b"k%d" % i for i in range(100) if split.side(b"k%d" % i) == "a")
    assert split.choose(key, lambda uid: True) == ("a", False)
    assert split.choose(key, lambda uid: uid != "a") == ("b", True)
    assert split.choose(key, lambda uid: False) == ("a", False)  # none healthy: its own side


# -- the Admin API ------------------------------------------------------------------

def mqtt(**conf):
    return {"plugins": {"mqtt-proxy": dict({"protocol_level": 4}, **conf)}}


PREFIX = "failed to check the configuration of stream plugin [mqtt-proxy]: "


@pytest.mark.parametrize("conf, msg", [
    (mqtt(vars=[["mqtt_username", "=", "a"]]),
     "failed to validate the 'vars' expression: invalid operator '='"),
    (mqtt(vars=["mqtt_username", "==", "a"]),
     "failed to validate the 'vars' expression: rule should be wrapped inside brackets"),
    (mqtt(vars=[["mqtt_username"]]), "failed to validate the 'vars' expression: "
     "invalid expression"),
    (mqtt(vars=[["mqtt_user", "==", "a"]]), "failed to validate the 'vars' expression: "
     "unknown variable 'mqtt_user' (one of: mqtt_client_id, mqtt_protocol_level, "
     "mqtt_protocol_name, mqtt_username, remote_addr, server_addr, server_port, sni, "
     "tls_client_cn)"),
    (mqtt(vars=[["mqtt_client_id", "~~", "(\\w+)\\1"]]), "failed to validate the 'vars' "
     "expression: invalid regex '(\\w+)\\1': invalid escape sequence: \\1"),
    (mqtt(vars="x"), 'property "vars" validation failed: wrong type: expected array, '
     "got string"),
    (mqtt(priority="1"), 'property "priority" validation failed: wrong type: expected '
     "integer, got string"),
    (mqtt(traffic_split={"weighted_upstreams": []}), 'property "traffic_split" validation '
     'failed: property "weighted_upstreams" validation failed: expect array to have at '
     "least 1 items"),
    (mqtt(traffic_split={"weighted_upstreams": [{"upstream": {"nodes": {}}}]}),
     "traffic_split: an inline upstream is not supported, name an upstream with upstream_id"),
    (mqtt(traffic_split={"key": "uri", "weighted_upstreams": [{}]}), 'property '
     '"traffic_split" validation failed: property "key" validation failed: matches non '
     "of the enum values"),  # sic: jsonschema.lua's wording
    (mqtt(traffic_split={"weighted_upstreams": [{"upstream_id": "nope"}]}),
     "failed to fetch upstream info by upstream id [nope], response code: 404"),
])
def test_bad_vars_priority_and_split_are_refused(seeded, conf, msg):
    rejected(seeded, "PUT", SR + "/2", conf, 400, error(PREFIX + msg))


def test_good_ones_are_stored_as_sent_and_loaded(seeded):
    conf = mqtt(vars=["OR", ["mqtt_username", "in", ["a", "b"]],
                      ["mqtt_client_id", "~*", "^dev-"]], priority=5,
                traffic_split={"weighted_upstreams": [{"upstream_id": 1, "weight": 10},
                                                      {"weight": 90}], "salt": "r1"})
    conf["upstream"] = UPSTREAM
    resp = seeded.put(SR + "/2", conf)
    assert resp.status_code == 201, body(resp)
    stored = seeded.store.get("stream_routes", "2").value
    assert stored["plugins"] == conf["plugins"]
    tbl = RouteTable([stored], [dict(UPSTREAM, id="1")])
    assert tbl.routes[0].priority == 5 and tbl.routes[0].split.upstream_ids == ("1", None)


def test_an_upstream_a_split_names_cannot_be_deleted(seeded):
    assert seeded.put(UP + "/2", UPSTREAM).status_code == 201
    conf = mqtt(traffic_split={"weighted_upstreams": [{"upstream_id": "2", "weight": 1},
                                                      {"weight": 9}]})
    assert seeded.put(SR + "/3", dict(conf, upstream=UPSTREAM)).status_code == 201
    rejected(seeded, "DELETE", UP + "/2", None, 400,
             error("can not delete this upstream, route [3] is still using it now"))


# -- the index by equality -----------------------------------------------------------

def test_a_connect_is_checked_only_against_routes_it_can_pass():
    tbl = RouteTable([route(str(i), [["mqtt_username", "==", "t%d" % i]]) for i in range(500)]
                     + [route("rx", [["mqtt_client_id", "~~", "^b-"]], priority=-1),
                        route("in", ["OR", ["mqtt_username", "in", ["x", "t7"]],
                                     ["mqtt_username", "==", "y"]], priority=1)])
    got = [r.id for r in tbl._refined.candidates(values(mqtt_username="t7"))]
    assert got == ["in", "7", "rx"]  # priority order kept across indexed and scanned routes
    assert [r.id for r in tbl._refined.candidates(values(mqtt_username="zz"))] == ["rx"]
    assert refined(tbl, mqtt_username="t7") == "in"
    assert refined(tbl, mqtt_username="t8") == "8"
    assert refined(tbl, mqtt_username="q", mqtt_client_id="b-1") == "rx"


@pytest.mark.parametrize("rule, need", [
    ([["u", "==", "a"]], ("u", {b"a"})),
    ([["u", "==", "a"], ["c", "in", ["x", "y"]]], ("u", {b"a"})),   # the narrowest
    (["OR", ["u", "==", "a"], ["u", "in", ["b"]]], ("u", {b"a", b"b"})),
    (["OR", ["u", "==", "a"], ["c", "==", "b"]], None),              # two variables
    ([["u", "!", "==", "a"]], None),
    ([["u", "==", 5]], None),                                       # numeric: "05" passes
    (["!AND", ["u", "==", "a"], ["u", "==", "a"]], None),
    (["AND", ["u", "==", "a"], ["OR", ["c", "~~", "x"], ["c", "==", "y"]]], ("u", {b"a"})),
])
def test_needs(rule, need):
    from gproxy.model.expr import compile as compile_expr
    got = compile_expr(rule).need
    assert (None if got is None else (got[0], set(got[1]))) == need


def test_the_index_never_drops_a_route_that_passes():
    from types import SimpleNamespace

    from hypothesis import given, settings
    from hypothesis import strategies as st

    from gproxy.model.expr import ExprError, compile as compile_expr
    from gproxy.model.varsroutes import VarsRoutes
    from tests.unit.test_expr import NAMES, RULES, VALUES

    def compiled(rule):
        try:
            return compile_expr(rule)
        except ExprError:
            return compile_expr([["a", "==", "x"]])

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.tuples(RULES, st.integers(-2, 2)), min_size=1, max_size=8),
           st.fixed_dictionaries({n: VALUES for n in NAMES}))
    def check(rules, vals):
        routes = [SimpleNamespace(id=str(i), priority=p, vars=compiled(rule))
                  for i, (rule, p) in enumerate(rules)]
        index = VarsRoutes(routes)
        enc = {k: None if v is None else v.encode() for k, v in vals.items()}
        want = [r.id for r in index.ordered if r.vars.eval(enc)]
        assert [r.id for r in index.candidates(enc) if r.vars.eval(enc)] == want
    check()


# -- rebalancing a split -----------------------------------------------------------

def split_table(percent):
    return RouteTable([{"id": "1", "plugins": {"mqtt-proxy": {
        "protocol_level": 4, "traffic_split": {"weighted_upstreams": [
            {"upstream_id": "new", "weight": percent}, {"weight": 100 - percent}]}}},
        "upstream": {"type": "roundrobin", "nodes": {"127.0.0.1:1883": 1}}}],
        [{"id": "new", "type": "roundrobin", "nodes": {"127.0.0.1:1884": 1}}])


def test_moving_a_split_misplaces_exactly_the_devices_it_moves():
    from gproxy.model.placement import Placement
    from tests.unit.test_sessions_query import Registry, add
    before, after = split_table(10).routes[0].split, split_table(20).routes[0].split
    reg = Registry()
    for i in range(1000):
        cid = "dev-%d" % i
        node = "127.0.0.1:1884" if before.side(cid.encode()) == "new" else "127.0.0.1:1883"
        add(reg, client_id=cid, node=node)
    place = Placement(split_table(20))
    misplaced = {info.client_id for info in reg._live.values() if place.misplaced(info)}
    moved = {"dev-%d" % i for i in range(1000)
             if before.side(b"dev-%d" % i) != after.side(b"dev-%d" % i)}
    assert misplaced == moved and 50 < len(moved) < 150
    assert Placement(split_table(10)).misplaced(next(iter(reg._live.values()))) is False
