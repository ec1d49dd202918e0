"""The indexed ip_port router answers exactly as APISIX's walk over every route.

The reference below is the walk written out from docs/apisix-behaviour.md §4.2
(SNI routes ranked exact > longer wildcard > shorter wildcard > "*", load order
among equals; then the routes without sni in load order), independent of
gproxy.model.iprouter; Hypothesis draws tables and connections and both must
pick the same route.
"""

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from gproxy.model.routes import RouteTable

PORTS = [9100, 9101, 9102]
NAMES = ["a.example.com", "b.example.com", "x.a.example.com", "A.Example.com"]
PATTERNS = NAMES + ["*.example.com", "*.a.example.com", "*"]
NETS = ["127.0.0.0/8", "127.0.0.2/32", "10.0.0.0/8", "::1/128"]


def reference(routes, server_ip, server_port, remote_ip, sni):
    def passes(conf):
        if "server_port" in conf and conf["server_port"] != server_port:
            return False
        for field, ip in (("remote_addr", remote_ip), ("server_addr", server_ip)):
            if field in conf:
                addr, net = ipaddress.ip_address(ip), ipaddress.ip_network(conf[field])
                if addr.version != net.version or addr not in net:
                    return False
        return True

    def takes(pattern, name):
        pattern, name = pattern.lower(), name.lower()
        if pattern.startswith("*"):
            return name.endswith(pattern[1:]) and len(name) > len(pattern) - 1
        return pattern == name

    def rank(conf):
        pattern = conf["sni"].lower()
        return (0, 0) if not pattern.startswith("*") else (1, -len(pattern))

    if sni:
        for conf in sorted((c for c in routes if "sni" in c), key=rank):
            if takes(conf["sni"], sni) and passes(conf):
                return conf["id"]
    for conf in routes:
        if "sni" not in conf and passes(conf):
            return conf["id"]
    return None


def route_conf(i, data):
    conf = {"id": str(i), "upstream": {"nodes": {"127.0.0.1:1980": 1}, "type": "roundrobin"}}
    if data.draw(st.booleans()):
        conf["server_port"] = data.draw(st.sampled_from(PORTS))
    if data.draw(st.integers(0, 3)) == 0:
        conf["remote_addr"] = data.draw(st.sampled_from(NETS))
    if data.draw(st.integers(0, 5)) == 0:
        conf["server_addr"] = data.draw(st.sampled_from(NETS))
    if data.draw(st.integers(0, 2)) == 0:
        conf["sni"] = data.draw(st.sampled_from(PATTERNS))
    return conf


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_indexed_router_picks_what_the_walk_picks(data):
    routes = [route_conf(i, data) for i in range(data.draw(st.integers(0, 12)))]
    table = RouteTable(routes, [])
    for _ in range(6):
        server_port = data.draw(st.sampled_from(PORTS + [9200]))
        remote = data.draw(st.sampled_from(["127.0.0.1", "127.0.0.2", "10.1.2.3", "::1"]))
        server = data.draw(st.sampled_from(["127.0.0.1", "10.0.0.1"]))
        sni = data.draw(st.sampled_from([None] + NAMES + ["other.org"]))
        got = table.match(server, server_port, remote, sni)
        assert (got.id if got else None) == reference(routes, server, server_port, remote, sni)


def test_a_connection_looks_only_at_the_routes_of_its_port():
    """10,000 routes on other ports: the one for this port is found without
    checking the others (counted, not timed)."""
    routes = [{"id": str(i), "server_port": 20000 + i,
               "upstream": {"nodes": {"127.0.0.1:1980": 1}}} for i in range(10000)]
    routes.append({"id": "last", "server_port": 9100,
                   "upstream": {"nodes": {"127.0.0.1:1980": 1}}})
    table = RouteTable(routes, [])
    checked = []
    for route in table.routes:
        original = route.matches
        route.matches = lambda *a, _o=original, _r=route: (checked.append(_r.id), _o(*a))[1]
    assert table.match("127.0.0.1", 9100, "127.0.0.1").id == "last"
    assert checked == ["last"]


def test_exact_server_names_are_looked_up_not_walked():
    routes = [{"id": str(i), "sni": "t%d.example.com" % i,
               "upstream": {"nodes": {"127.0.0.1:1980": 1}}} for i in range(5000)]
    table = RouteTable(routes, [])
    checked = []
    for route in table.routes:
        original = route.matches
        route.matches = lambda *a, _o=original, _r=route: (checked.append(_r.id), _o(*a))[1]
    assert table.match("127.0.0.1", 9100, "127.0.0.1", "T4999.example.com").id == "4999"
    assert checked == ["4999"]
