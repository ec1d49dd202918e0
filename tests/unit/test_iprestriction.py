"""The stream ip-restriction plugin: APISIX's schema wording, matching, the phase.

Matching is checked against a plain model (``ipaddress`` membership over the
list, one network at a time) on random addresses and lists, IPv4 and IPv6.
The phase runs on a real RouteTable and Registry with a fake client that
must never be read.
"""

import ipaddress
import logging
import random

import pytest

from gproxy.errors import SchemaError
from gproxy.model.iprestriction import IpRestriction, IpSet
from gproxy.model.resources import check_stream_route
from gproxy.model.routes import RouteTable
from gproxy.proxy.session import phases
from tests.unit.test_phases import logs, make_session, route  # noqa: F401 (fixture)

PREFIX = "failed to check the configuration of stream plugin [ip-restriction]: "


@pytest.mark.parametrize("conf, error", [
    ({}, "value should match only one schema, but matches none"),  # APISIX's TEST 5
    ({"whitelist": ["127.0.0.1"], "blacklist": ["10.0.0.1"]},
     "value should match only one schema, but matches both schemas 1 and 2"),
    ({"whitelist": []}, 'property "whitelist" validation failed: '
                        "expect array to have at least 1 items"),
    ({"blacklist": ["::1/129"]}, "invalid ip address: ::1/129"),
    ({"blacklist": ["1.2.3.4"], "response_code": 500},
     'property "response_code" validation failed: expected 500 to be smaller than 404'),
    ({"blacklist": ["1.2.3.4"], "message": ""},
     'property "message" validation failed: string too short, expected at least 1, got 0'),
])
def test_schema_in_apisix_words(conf, error):
    with pytest.raises(SchemaError) as exc:
        check_stream_route({"plugins": {"ip-restriction": conf}})
    assert str(exc.value) == PREFIX + error


def test_valid_confs_pass():
    for conf in ({"whitelist": ["127.0.0.0/24", "::1", "fe80::/10"]},
                 {"blacklist": ["10.0.0.1"], "message": "go away", "response_code": 404}):
        check_stream_route({"plugins": {"ip-restriction": conf}})


def random_cidr(rng):
    if rng.random() < 0.5:
        addr, bits = ipaddress.IPv4Address(rng.getrandbits(32)), 32
    else:
        addr, bits = ipaddress.IPv6Address(rng.getrandbits(128)), 128
    prefix = rng.choice([0, 1, 8, 16, 24, bits - 1, bits, rng.randrange(bits + 1)])
    return str(ipaddress.ip_network("%s/%d" % (addr, prefix), strict=False))


def near(rng, cidr):
    """An address inside ``cidr`` or just outside it."""
    net = ipaddress.ip_network(cidr)
    value = int(net.network_address) + rng.randrange(net.num_addresses)
    value += rng.choice([0, 0, net.num_addresses, -1])
    value %= 2 ** net.max_prefixlen
    return str(ipaddress.IPv4Address(value) if net.version == 4 else ipaddress.IPv6Address(value))


def test_ipset_matches_like_a_scan_of_the_list():
    rng = random.Random(24)
    for _ in range(200):
        cidrs = [random_cidr(rng) for _ in range(rng.randrange(1, 8))]
        nets = [ipaddress.ip_network(c) for c in cidrs]
        found = IpSet(cidrs)
        for _ in range(20):
            ip = near(rng, rng.choice(cidrs))
            addr = ipaddress.ip_address(ip)
            want = any(addr.version == n.version and addr in n for n in nets)
            assert (ip in found) == want, (ip, cidrs)


def test_plain_addresses_mapped_ipv4_and_garbage():
    found = IpSet(["127.0.0.1", "::1", "10.0.0.0/8"])
    assert "127.0.0.1" in found and "::1" in found and "10.9.8.7" in found
    assert "::ffff:10.1.1.1" in found  # an IPv4 client on a dual-stack listener
    assert "127.0.0.2" not in found and "::2" not in found and "not-an-ip" not in found


def test_whitelist_blacklist_and_code():
    white = IpRestriction({"whitelist": ["127.0.0.0/24"]})
    assert white.refuses("127.0.0.9") is None and white.refuses("::1") == 403
    black = IpRestriction({"blacklist": ["::1"], "response_code": 404})
    assert black.refuses("::1") == 404 and black.refuses("127.0.0.1") is None


def test_the_phase_refuses_before_reading_and_counts_like_limit_conn(logs):  # noqa: F811
    conf = route(plugins={"ip-restriction": {"blacklist": ["127.0.0.0/24"]},
                          "mqtt-proxy": {"protocol_level": 4}})
    s = make_session(b"\x10never read", routes=[conf])
    s.run()
    assert s.sock.reads == 0 and s.sock.closed
    assert s.registry.rejected == {"ip_restriction": 1}
    assert logs(logging.WARNING) == [
        "*1 ip-restriction exits with status code 403 while prereading client data, "
        "client: 127.0.0.1, server: 0.0.0.0:9100"]
    assert phases.COMMON.index(phases.ip_restriction) < phases.COMMON.index(phases.limits)


def test_a_listed_client_goes_on():
    conf = route(plugins={"ip-restriction": {"whitelist": ["127.0.0.1"]}})
    s = make_session(routes=[conf])
    for phase in phases.COMMON[:3]:
        phase(s)
    assert s.registry.rejected == {}
    assert RouteTable([conf]).routes[0].ip_restriction.whitelist is not None
