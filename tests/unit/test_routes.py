"""RouteTable: APISIX's ip_port matching order and upstream resolution (pure, no sockets)."""

import pytest

from gproxy.model.balancer import Node
from gproxy.model.routes import RouteTable, Upstream, parse_nodes

UP = {"type": "roundrobin", "nodes": [{"host": "127.0.0.1", "port": 1883, "weight": 1}]}


def table(*routes, upstreams=()):
    return RouteTable(list(routes), list(upstreams))


def matched(tbl, server=("127.0.0.1", 9100), remote="127.0.0.1", sni=None):
    route = tbl.match(server[0], server[1], remote, sni)
    return None if route is None else route.id


def test_no_routes_matches_nothing():
    assert matched(table()) is None


def test_a_route_without_filters_matches_everything():
    tbl = table({"id": 1, "upstream": UP})
    assert matched(tbl) == "1"
    assert matched(tbl, ("10.0.0.1", 1), "2001:db8::1") == "1"


@pytest.mark.parametrize("filters, server, remote, hit", [
    ({"server_port": 9100}, ("127.0.0.1", 9100), "127.0.0.1", True),
    ({"server_port": 9100}, ("127.0.0.1", 9101), "127.0.0.1", False),
    ({"server_addr": "127.0.0.1"}, ("127.0.0.1", 9100), "10.1.1.1", True),
    ({"server_addr": "127.0.0.2"}, ("127.0.0.1", 9100), "10.1.1.1", False),
    ({"remote_addr": "10.0.0.0/8"}, ("127.0.0.1", 9100), "10.200.3.4", True),
    ({"remote_addr": "10.0.0.0/8"}, ("127.0.0.1", 9100), "11.0.0.1", False),
    ({"remote_addr": "192.168.1.7"}, ("127.0.0.1", 9100), "192.168.1.7", True),
    ({"remote_addr": "2001:db8::/32"}, ("::1", 9100), "2001:db8::5", True),
    ({"remote_addr": "2001:db8::/32"}, ("::1", 9100), "2001:db9::5", False),
    ({"remote_addr": "10.0.0.0/8"}, ("::1", 9100), "2001:db8::5", False),  # family mismatch
    ({"remote_addr": "10.0.0.0/8"}, ("::", 9100), "::ffff:10.1.2.3", True),  # dual stack
    ({"server_port": 9100, "remote_addr": "127.0.0.0/8"}, ("127.0.0.1", 9100), "127.9.9.9", True),
    ({"server_port": 9100, "remote_addr": "127.0.0.0/8"}, ("127.0.0.1", 9100), "10.0.0.1", False),
])
def test_filters_are_anded_and_missing_ones_match_anything(filters, server, remote, hit):
    tbl = table(dict(filters, id="r", upstream=UP))
    assert (matched(tbl, server, remote) == "r") is hit


def test_first_route_in_load_order_wins_not_the_most_specific():
    tbl = table({"id": "broad", "remote_addr": "0.0.0.0/0", "upstream": UP},
                {"id": "narrow", "remote_addr": "127.0.0.1", "server_port": 9100,
                 "upstream": UP})
    assert matched(tbl) == "broad"


def test_sni_routes_never_match_plain_tcp_and_match_their_sni_first():
    tbl = table({"id": "plain", "upstream": UP},
                {"id": "tls", "sni": "*.example.com", "upstream": UP})
    assert matched(tbl) == "plain"
    assert matched(tbl, sni="a.b.example.com") == "tls"
    assert matched(tbl, sni="example.org") == "plain"


def test_xrpc_subordinate_routes_are_skipped():
    tbl = table({"id": "sub", "protocol": {"name": "x", "superior_id": 1}, "upstream": UP})
    assert matched(tbl) is None


def test_upstream_id_wins_over_inline_upstream():
    tbl = table({"id": 1, "upstream_id": 7, "upstream": UP},
                upstreams=[{"id": 7, "nodes": {"127.0.0.9:1999": 1}}])
    up, err = tbl.upstream_for(tbl.routes[0])
    assert err is None and [n.addr for n in up.nodes] == ["127.0.0.9:1999"]


def test_upstream_errors_use_apisix_wording():
    tbl = table({"id": 1, "upstream_id": 7}, {"id": 2})
    assert tbl.upstream_for(tbl.routes[0]) == (None, "failed to find upstream by id: 7")
    assert tbl.upstream_for(tbl.routes[1]) == (
        None, "failed to set upstream: missing upstream configuration in Route or Service")


def test_deprecated_plugin_upstream_is_used_only_without_another():
    plugin = {"mqtt-proxy": {"protocol_level": 4,
                             "upstream": {"host": "127.0.0.3", "port": 1883}}}
    alone = table({"id": 1, "plugins": plugin})
    up, err = alone.upstream_for(alone.routes[0])
    assert err is None and [n.addr for n in up.nodes] == ["127.0.0.3:1883"]
    both = table({"id": 1, "plugins": plugin, "upstream": UP})
    assert [n.addr for n in both.upstream_for(both.routes[0])[0].nodes] == ["127.0.0.1:1883"]


def test_mqtt_conf_defaults_protocol_name():
    tbl = table({"id": 1, "plugins": {"mqtt-proxy": {"protocol_level": 5}}, "upstream": UP})
    assert (tbl.routes[0].mqtt.protocol_name, tbl.routes[0].mqtt.protocol_level) == ("MQTT", 5)
    assert table({"id": 1, "upstream": UP}).routes[0].mqtt is None


def test_parse_nodes_both_forms_and_ipv6():
    assert parse_nodes({"127.0.0.1:1995": 2, "[::1]:1996": 1}) == [
        Node("127.0.0.1", 1995, 2), Node("[::1]", 1996, 1)]
    assert parse_nodes([{"host": "b.example", "port": 1, "weight": 0, "priority": -1}]) == [
        Node("b.example", 1, 0, -1)]
    assert Node("[::1]", 1996).addr == "[::1]:1996" and Node("::1", 1).addr == "[::1]:1"
    assert Node("[::1]", 1996).dial_host == "::1"


def test_upstream_timeouts_and_retries():
    plain = Upstream(UP)
    assert (plain.connect_timeout, plain.idle_timeout, plain.tries(3)) == (None, None, 3)
    tuned = Upstream(dict(UP, retries=0, timeout={"connect": 2, "send": 5, "read": 9}))
    assert (tuned.connect_timeout, tuned.idle_timeout, tuned.tries(3)) == (2, 9, 1)
    assert Upstream({"nodes": {"db.example:1": 1}}).needs_dns
    assert not Upstream(UP).needs_dns


def test_roundrobin_state_is_shared_by_sessions_of_one_table():
    tbl = table({"id": 1, "upstream": {"type": "roundrobin", "nodes": {
        "127.0.0.1:1": 1, "127.0.0.2:1": 1}}})
    up = tbl.upstream_for(tbl.routes[0])[0]
    picks = [next(up.balancer().candidates(None, 1)).host for _ in range(4)]
    assert sorted(picks) == ["127.0.0.1", "127.0.0.1", "127.0.0.2", "127.0.0.2"]
    assert picks[0] != picks[1]
