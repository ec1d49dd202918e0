"""The refine and split phases without sockets (docs/routing.md).

Sessions run the whole common pipeline on fake endpoints (tests/unit/test_phases.py's
helpers): which route the CONNECT chose, which route's checks, limits and
rewrite applied, what the registry counted, the log lines, and the upstream a
traffic split picked.
"""

import logging

import pytest

from gproxy.model.health import Checks, HealthState
from gproxy.proxy.session import phases
from tests import packets
from tests.unit.test_phases import (NODE_A, NODE_B, TAIL, dialler, logs, make_session,  # noqa: F401
                                    run_until_hand_off)

ONE_A = {"type": "roundrobin", "nodes": {NODE_A: 1}}
ONE_B = {"type": "roundrobin", "nodes": {NODE_B: 1}}


def vroute(rid, vars_=None, level=4, upstream=ONE_A, priority=None, **conf):
    plugin = dict({"protocol_level": level}, **conf)
    if vars_ is not None:
        plugin["vars"] = vars_
    if priority is not None:
        plugin["priority"] = priority
    return {"id": rid, "plugins": {"mqtt-proxy": plugin}, "upstream": upstream}


TENANTS = [vroute("default", upstream=ONE_A),
           vroute("a", [["mqtt_username", "==", "tenant-a"]], upstream=ONE_B)]


def run(connect, routes, monkeypatch, dialler, **kw):
    s = make_session(connect, routes=routes, **kw)
    fake = dialler()
    handed = run_until_hand_off(s, monkeypatch)
    return s, fake, handed


def test_the_connect_chooses_the_tenant_route(monkeypatch, dialler, logs):
    connect = packets.connect_v311("dev-1", username="tenant-a", password="secret")
    s, fake, handed = run(connect, TENANTS, monkeypatch, dialler)
    assert len(handed) == 1 and fake.tried == [NODE_B]
    assert s.route.id == "a" and s.info.route_id == "a"
    assert s.upstream_sock.sent == connect  # every byte, unchanged
    assert (s.registry.route_total, s.registry.per_route) == ({"a": 1}, {})
    lines = logs(logging.INFO)
    assert "*1 mqtt client id: dev-1 while prereading client data" + TAIL in lines
    assert ("*1 route chosen by the connect: route=a priority=0 while prereading client data"
            + TAIL) in lines
    assert not [ln for ln in lines if "secret" in ln]


def test_a_client_no_vars_take_goes_to_the_fallback(monkeypatch, dialler):
    s, fake, handed = run(packets.connect_v311("dev-2", username="tenant-z"), TENANTS,
                          monkeypatch, dialler)
    assert s.route.id == "default" and fake.tried == [NODE_A] and len(handed) == 1


def test_the_route_counts_while_relaying():
    s = make_session(packets.connect_v311("d", username="tenant-a"), routes=TENANTS)
    phases.match_route(s)
    assert s.route is None and s.registry.per_route == {} and len(s.registry) == 1
    phases.find_upstream(s)
    phases.limits(s)
    assert s.upstream is None  # both wait for the refine
    phases.preread(s)
    phases.refine(s)
    assert s.registry.per_route == {"a": 1} and s.upstream.nodes[0].addr == NODE_B


def test_no_route_passing_is_not_hit_any_route_after_the_preread(monkeypatch, dialler, logs):
    routes = [vroute("a", [["mqtt_username", "==", "tenant-a"]])]
    s, fake, handed = run(packets.connect_v311("x"), routes, monkeypatch, dialler)
    assert handed == [] and fake.tried == [] and s.sock.reads >= 1
    assert s.registry.rejected == {"no_route": 1} and len(s.registry) == 0
    assert logs(logging.INFO)[-1] == (
        "*1 match(): not hit any route while prereading client data" + TAIL)


def test_candidates_may_differ_in_protocol_level(monkeypatch, dialler):
    routes = [vroute("v5", [["mqtt_protocol_level", "==", 5]], level=5, upstream=ONE_B),
              vroute("v311", level=4, upstream=ONE_A)]
    s, fake, _ = run(packets.connect_v5("five"), routes, monkeypatch, dialler)
    assert s.route.id == "v5" and fake.tried == [NODE_B]
    s, fake, _ = run(packets.connect_v311("four"), routes, monkeypatch, dialler)
    assert s.route.id == "v311" and fake.tried == [NODE_A]


def test_the_chosen_routes_own_protocol_check_applies(monkeypatch, dialler, logs):
    routes = [vroute("a", [["mqtt_username", "==", "tenant-a"]], level=4)]
    s, fake, handed = run(packets.connect_v5("five", username="tenant-a"), routes,
                          monkeypatch, dialler)
    assert handed == [] and fake.tried == [] and s.registry.rejected == {"protocol_level": 1}
    assert logs(logging.WARNING)[-2:] == [
        "*1 expect protocol level: 4, but got 5 while prereading client data" + TAIL,
        "*1 mqtt-proxy exits with status code 503 while prereading client data" + TAIL]


def test_each_route_keeps_its_own_limits(monkeypatch, dialler, logs):
    limited = dict(vroute("a", [["mqtt_username", "==", "tenant-a"]]),
                   plugins={"mqtt-proxy": {"protocol_level": 4,
                                           "vars": [["mqtt_username", "==", "tenant-a"]]},
                            "gproxy-limit-rate": {"rate": 0.001, "burst": 0}})
    routes = [limited, vroute("default", upstream=ONE_B)]
    first = make_session(packets.connect_v311("1", username="tenant-a"), routes=routes)
    dialler()
    assert len(run_until_hand_off(first, monkeypatch)) == 1
    again = make_session(packets.connect_v311("2", username="tenant-a"), routes=routes)
    again.proxy.limits = first.proxy.limits  # one process: one Limits table
    assert run_until_hand_off(again, monkeypatch) == []
    assert again.registry.rejected == {"limit_rate": 1}
    other = make_session(packets.connect_v311("3", username="tenant-b"), routes=routes)
    other.proxy.limits = first.proxy.limits
    assert len(run_until_hand_off(other, monkeypatch)) == 1  # another tenant: no limit


def test_the_rewrite_is_the_chosen_routes_and_routing_sees_the_original(monkeypatch,
                                                                        dialler):
    routes = [vroute("a", [["mqtt_username", "==", "tenant-a"]],
                     set_connect={"client_id": "a/$mqtt_client_id"}),
              vroute("default", upstream=ONE_B)]
    s, fake, _ = run(packets.connect_v311("dev", username="tenant-a"), routes, monkeypatch,
                     dialler)
    assert s.route.id == "a"
    assert s.upstream_sock.sent == packets.connect_v311("a/dev", username="tenant-a")


def test_a_plain_tcp_fallback_gets_the_bytes_as_read(monkeypatch, dialler):
    routes = [vroute("a", [["mqtt_username", "==", "tenant-a"]]),
              {"id": "tcp", "upstream": ONE_B}]
    wire = packets.connect_v311("x", username="someone") + packets.pingreq()
    s, fake, _ = run(wire, routes, monkeypatch, dialler)
    assert s.route.id == "tcp" and fake.tried == [NODE_B] and s.upstream_sock.sent == wire


# -- the traffic split -------------------------------------------------------------------

SPLIT_UPSTREAMS = [{"id": "canary", "type": "roundrobin", "nodes": {NODE_B: 1}}]


def split_route(weight, **split):
    conf = dict({"weighted_upstreams": [{"upstream_id": "canary", "weight": weight},
                                         {"weight": 100 - weight}]}, **split)
    return [vroute("1", traffic_split=conf, upstream=ONE_A)]


def side_of(client_id, monkeypatch, dialler, weight, upstreams=SPLIT_UPSTREAMS, prepare=None,
            **kw):
    s = make_session(packets.connect_v311(client_id), routes=split_route(weight),
                     upstreams=upstreams, **kw)
    if prepare is not None:
        prepare(s.table)
    fake = dialler()
    run_until_hand_off(s, monkeypatch)
    return s, fake.tried


def test_the_split_sends_a_client_id_to_its_side(monkeypatch, dialler):
    ids = ["dev-%d" % i for i in range(200)]
    sides = {i: side_of(i, monkeypatch, dialler, 30)[1][0] for i in ids}
    canary = [i for i in ids if sides[i] == NODE_B]
    assert 30 < len(canary) < 90
    for client_id in canary[:5] + ids[:5]:  # again: the same side
        assert side_of(client_id, monkeypatch, dialler, 30)[1] == [sides[client_id]]
    s, _ = side_of(canary[0], monkeypatch, dialler, 30)
    assert s.info.upstream_id == "canary"


def test_without_a_client_id_the_client_address_is_the_key(monkeypatch, dialler):
    seen = {side_of("", monkeypatch, dialler, 50, client=("10.0.0.%d" % n, 1000))[1][0]
            for n in range(1, 30)}
    assert seen == {NODE_A, NODE_B}
    one = {side_of("", monkeypatch, dialler, 50, client=("10.0.0.7", p))[1][0]
           for p in range(1000, 1010)}
    assert len(one) == 1  # one address: one side


def test_a_side_without_a_healthy_node_gives_its_clients_to_the_next(monkeypatch, dialler,
                                                                     logs):
    def canary_down(table):
        canary = table.upstreams["canary"]
        canary.health = HealthState(canary.name, Checks({"active": {"type": "tcp"}}),
                                    canary.nodes)
        canary.health.unhealthy.add(NODE_B)  # what the checker sets for a node it marks down

    dev = next("dev-%d" % i for i in range(100)
               if side_of("dev-%d" % i, monkeypatch, dialler, 50)[1] == [NODE_B])
    s, tried = side_of(dev, monkeypatch, dialler, 50, prepare=canary_down)
    assert tried == [NODE_A] and s.info.upstream_id is None
    assert any("traffic split: no healthy node on the client's side" in ln
               for ln in logs(logging.WARNING))


def test_a_split_naming_a_missing_upstream_refuses_with_apisix_words(monkeypatch, dialler,
                                                                    logs):
    s, tried = side_of("dev-1", monkeypatch, dialler, 100, upstreams=[])
    assert tried == [] and s.registry.rejected == {"no_upstream": 1}
    assert "failed to find upstream by id: canary" in logs(logging.ERROR)[-1]


@pytest.mark.parametrize("weight", [0, 100])
def test_zero_and_all(monkeypatch, dialler, weight):
    tried = {side_of("dev-%d" % i, monkeypatch, dialler, weight)[1][0] for i in range(30)}
    assert tried == ({NODE_A} if weight == 0 else {NODE_B})


def test_ip_restriction_of_the_chosen_route_applies_after_the_refine(monkeypatch, dialler,
                                                                     logs):
    blocked = vroute("a", [["mqtt_username", "==", "tenant-a"]])
    blocked["plugins"]["ip-restriction"] = {"blacklist": ["127.0.0.0/8"]}
    routes = [blocked, vroute("default", upstream=ONE_B)]
    s, fake, handed = run(packets.connect_v311("1", username="tenant-a"), routes, monkeypatch,
                          dialler)
    assert handed == [] and fake.tried == [] and s.registry.rejected == {"ip_restriction": 1}
    assert s.sock.reads >= 1  # the route, so its restriction, is known only from the CONNECT
    assert "ip-restriction exits with status code 403" in logs(logging.WARNING)[-1]
    s, fake, handed = run(packets.connect_v311("2", username="tenant-b"), routes, monkeypatch,
                          dialler)
    assert len(handed) == 1 and fake.tried == [NODE_B]
