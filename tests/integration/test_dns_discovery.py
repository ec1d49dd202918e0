"""DNS service discovery against a real DNS server (Debian's dnsmasq).

First the resolver alone: APISIX's rules for A, AAAA, SRV (weights, weight 0,
ports, priorities), CNAME, NXDOMAIN and a dead server, over real DNS
messages.  Then a real gproxy whose chash upstream is ``discovery_type:
dns``: the records change while sessions are held open (dnsmasq re-reads its
hosts file on SIGHUP), gproxy follows within the TTL (the ring rebuilt:
clients land where an independent model of APISIX's ring says), live
sessions are untouched, and when dnsmasq is killed the last good answer
stays in use.
"""

import os
import socket

import pytest

from tests import packets
from tests.integration import dnsmasq
from tests.integration.conftest import HOST, mqtt_route, wait_until
from tests.integration.helpers import CONNACK_OK, ApisixRing, recv_exact
from tests.integration.test_admin_e2e import HostBroker  # mosquitto on 127.0.0.x:port
from tests.needs import require

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _needs_dnsmasq():
    require(dnsmasq.available(), "DNS discovery tests need dnsmasq (apt-get install "
            "dnsmasq-base)")


@pytest.fixture
def dns(tmp_path):
    made = []

    def make(**kw):
        made.append(dnsmasq.Dnsmasq(str(tmp_path), **kw).start())
        return made[-1]
    yield make
    for server in made:
        server.stop()


def resolver(server, **kw):
    from gproxy.discovery.dns import DnsResolver
    from gproxy.discovery.dnsclient import DnsClient, parse_server
    return DnsResolver(DnsClient([parse_server(server.server)], timeout=1, rounds=2), **kw)


def nodes(server, name, **kw):
    from gproxy.model.discovery import nodes as to_nodes, split_service
    records, ttl = resolver(server, **kw).resolve(split_service(name)[0])
    return to_nodes(name, records), ttl


def test_resolver_follows_apisix_rules_over_real_dns(dns):
    server = dns(hosts=[("127.0.0.2", "a.svc.test"), ("127.0.0.3", "a.svc.test"),
                        ("::1", "six.svc.test"), ("127.0.0.5", "t1.svc.test"),
                        ("127.0.0.6", "t2.svc.test"), ("127.0.0.7", "t2.svc.test")],
                 srv=[("_mq._tcp.svc.test", "t1.svc.test", 1883, 10, 0),
                      ("_mq._tcp.svc.test", "t2.svc.test", 1884, 20, 5)],
                 cname=[("alias.svc.test", "a.svc.test")], ttl=7)
    found, ttl = nodes(server, "a.svc.test:1883")
    assert sorted(n["host"] for n in found) == ["127.0.0.2", "127.0.0.3"] and ttl == 7
    assert all(n["port"] == 1883 and n["weight"] == 1 and "priority" not in n for n in found)
    assert nodes(server, "a.svc.test")[0] == []  # stream: no port, no node (APISIX)
    assert nodes(server, "[::1]:1883")[0] == [  # an address is its own answer
        {"host": "::1", "port": 1883, "weight": 1}]
    assert nodes(server, "six.svc.test:1883")[0] == [
        {"host": "::1", "port": 1883, "weight": 1}]
    assert nodes(server, "six.svc.test:1883", ipv6=False)[0] == []
    srv = sorted(nodes(server, "_mq._tcp.svc.test")[0], key=lambda n: n["host"])
    # weight 0 counts as 1; t2's 5 is split over its two addresses; x lcm(1, 2) = 2
    assert srv == [{"host": "127.0.0.5", "port": 1883, "weight": 2, "priority": -10},
                   {"host": "127.0.0.6", "port": 1884, "weight": 5, "priority": -20},
                   {"host": "127.0.0.7", "port": 1884, "weight": 5, "priority": -20}]
    # a port in service_name wins over the SRV record's
    assert {n["port"] for n in nodes(server, "_mq._tcp.svc.test:9999")[0]} == {9999}
    assert sorted(n["host"] for n in nodes(server, "alias.svc.test:1")[0]) == [
        "127.0.0.2", "127.0.0.3"]
    assert nodes(server, "missing.svc.test:1883") == ([], 30.0)  # NXDOMAIN: authoritative


def test_a_dead_server_is_a_failure_not_an_empty_answer(dns):
    from gproxy.discovery.dnsclient import DnsFailure
    server = dns(hosts=[("127.0.0.2", "a.svc.test")])
    probe = resolver(server)
    assert probe.resolve("a.svc.test")[0]
    server.kill()
    with pytest.raises(DnsFailure, match="failed to query the DNS server"):
        probe.resolve("a.svc.test")


# -- a real gproxy following dnsmasq --------------------------------------------------

@pytest.fixture
def brokers(tmp_path):
    from tests.integration.conftest import free_port
    port = free_port()
    made = []

    def make(host):
        broker = HostBroker(str(tmp_path), "mq-%s" % host, host, port)
        broker.start()
        made.append(broker)
        return broker
    yield make
    for broker in made:
        broker.stop()


class Held:
    """MQTT sessions through gproxy, kept open."""

    def __init__(self, port):
        self.port, self.socks = port, {}

    def open(self, client_id):
        sock = socket.create_connection((HOST, self.port), timeout=5)
        sock.sendall(packets.connect_v311(client_id))
        packets.assert_packet(recv_exact(sock, 4), CONNACK_OK, "CONNACK for %s" % client_id)
        self.socks[client_id] = sock

    def all_alive(self):
        for cid, sock in self.socks.items():
            sock.sendall(packets.pingreq())
            packets.assert_packet(recv_exact(sock, 2), b"\xd0\x00", "PINGRESP for %s" % cid)
        return True

    def close(self):
        for sock in self.socks.values():
            sock.close()


def landed(brokers, ids):
    return {cid: next(b.addr for b in brokers if cid in b.client_ids()) for cid in ids}


def test_gproxy_follows_dnsmasq_and_survives_its_death(gproxy, dns, brokers):
    b2, b3, b4 = brokers("127.0.0.2"), brokers("127.0.0.3"), brokers("127.0.0.4")
    port = b2.port
    server = dns(hosts=[("127.0.0.2", "mq.svc.test"), ("127.0.0.3", "mq.svc.test")])
    name = "mq.svc.test:%d" % port
    route = mqtt_route([], route_id=1)
    route["upstream"] = {"type": "chash", "key": "mqtt_client_id", "discovery_type": "dns",
                         "service_name": name}
    gp = gproxy([route], config={"discovery": {"dns": {"servers": [server.server]}}})
    held = Held(gp.port)
    try:
        first = ["dns-a-%d" % i for i in range(20)]
        for cid in first:
            held.open(cid)
        two = ApisixRing([(b.host, port, 1) for b in (b2, b3)])
        assert landed([b2, b3], first) == {cid: two.pick(cid) for cid in first}

        mark = gp.mark()
        server.set_hosts([("127.0.0.2", "mq.svc.test"), ("127.0.0.3", "mq.svc.test"),
                          ("127.0.0.4", "mq.svc.test")])
        server.reload()
        gp.wait_for_log("dns discovery: %s -> " % name, timeout=10, since=mark)
        assert held.all_alive()  # the change touched no live session
        three = ApisixRing([(b.host, port, 1) for b in (b2, b3, b4)])
        then = ["dns-b-%d" % i for i in range(20)]
        for cid in then:
            held.open(cid)
        assert landed([b2, b3, b4], then) == {cid: three.pick(cid) for cid in then}
        assert any(three.pick(cid) == b4.addr for cid in then)

        mark = gp.mark()
        server.kill()
        gp.wait_for_log("keeping the last good answer (3 nodes)", timeout=10, since=mark)
        last = ["dns-c-%d" % i for i in range(10)]
        for cid in last:
            held.open(cid)
        assert landed([b2, b3, b4], last) == {cid: three.pick(cid) for cid in last}
        assert held.all_alive()
        assert gp.admin("GET", "/stream_routes/1")[1]["value"]["upstream"].get("nodes") is None
    finally:
        held.close()


def test_workers_get_discovered_nodes_and_write_one_access_log(gproxy, dns, brokers, tmp_path):
    b2, b3 = brokers("127.0.0.2"), brokers("127.0.0.3")
    server = dns(hosts=[("127.0.0.2", "w.svc.test")])
    name = "w.svc.test:%d" % b2.port
    route = mqtt_route([], route_id=1, type_="least_conn")
    route["upstream"] = {"type": "least_conn", "discovery_type": "dns", "service_name": name}
    gp = gproxy([route], workers=2, config={
        "discovery": {"dns": {"servers": [server.server]}},
        "nginx_config": {"stream": {"enable_access_log": True,
                                    "access_log_format": "$pid $mqtt_client_id $upstream_addr"}}})
    held = Held(gp.port)
    try:
        for i in range(6):
            held.open("w-a-%d" % i)
        mark = gp.mark()
        server.set_hosts([("127.0.0.2", "w.svc.test"), ("127.0.0.3", "w.svc.test")])
        server.reload()
        gp.wait_for_log("dns discovery: %s -> " % name, timeout=10, since=mark)
        # the parent pushed the new table to both workers: new sessions reach b3 too
        for i in range(12):
            held.open("w-b-%d" % i)
        assert {cid for cid in held.socks if cid.startswith("w-b")} & set(b3.client_ids())
        assert held.all_alive()
    finally:
        held.close()
    path = os.path.join(gp.dir, "logs", "access_stream.log")
    found = wait_until(lambda: _log_lines(path, 18), 10)
    assert found, _log_lines(path, 0)
    assert {line.split()[1] for line in found} == set(held.socks)
    pids = {line.split()[0] for line in found}
    assert str(gp.proc.pid) not in pids  # written by the workers, where the sessions live


def _log_lines(path, count):
    try:
        with open(path) as fh:
            lines = fh.read().splitlines()
    except FileNotFoundError:
        return None
    return lines if len(lines) >= count else None
