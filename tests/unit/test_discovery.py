"""DNS discovery without a network: APISIX's record rules, the watcher, the config.

The rules (ports, SRV weights and priorities) are checked against the
worked example of APISIX's docs/en/latest/discovery/dns.md, as APISIX's
code computes it (weights times the lcm of the address counts).  The
watcher runs on gevent with a scripted resolver: a failure keeps the last
good answer, a change rebuilds once, the TTL paces the lookups.
"""

import copy
import logging

import gevent
import pytest

from gproxy.config import Config
from gproxy.discovery import dns as discovery
from gproxy.discovery.dnsclient import DnsFailure, parse_server
from gproxy.errors import ConfigError
from gproxy.model.discovery import (Record, nodes, service_names, split_service,
                                    srv_records, with_nodes)
from gproxy.model.routes import RouteTable


def test_split_service():
    assert split_service("a.svc:1980") == ("a.svc", 1980)
    assert split_service("a.svc") == ("a.svc", None)
    assert split_service("[::1]:80") == ("::1", 80)
    assert parse_server("127.0.0.1:8600") == ("127.0.0.1", 8600)
    assert parse_server("127.0.0.1") == ("127.0.0.1", 53)
    assert parse_server("[::1]:5353") == ("::1", 5353)


def test_the_srv_example_of_apisix_docs():
    # srv 86400 IN SRV 10 60 1980 A  (A: 1.1.1.1)
    # srv 86400 IN SRV 20 20 1981 B  (B: 1.1.1.2, 1.1.1.3)
    records = srv_records([(10, 60, 1980, ["1.1.1.1"]), (20, 20, 1981, ["1.1.1.2", "1.1.1.3"])])
    assert nodes("srv.blah.service", records) == [
        {"host": "1.1.1.1", "port": 1980, "weight": 120, "priority": -10},
        {"host": "1.1.1.2", "port": 1981, "weight": 20, "priority": -20},
        {"host": "1.1.1.3", "port": 1981, "weight": 20, "priority": -20}]


def test_ports_weight_zero_and_stream_nodes_without_a_port():
    records = srv_records([(0, 0, 0, ["10.0.0.1"]), (0, 0, 1883, ["10.0.0.2"])])
    assert nodes("svc", records) == [  # port 0 and no service port: dropped in stream
        {"host": "10.0.0.2", "port": 1883, "weight": 1, "priority": 0}]
    assert [n["port"] for n in nodes("svc:8848", records)] == [8848, 8848]
    assert nodes("svc:1", [Record("10.0.0.9")]) == [{"host": "10.0.0.9", "port": 1, "weight": 1}]
    assert nodes("svc", [Record("10.0.0.9")]) == []


def data():
    return {"upstreams": [{"id": "1", "service_name": "a:1", "discovery_type": "dns"},
                          {"id": "2", "nodes": {"127.0.0.1:1": 1}},
                          {"id": "3", "service_name": "x", "discovery_type": "consul"}],
            "stream_routes": [{"id": "9", "upstream": {"service_name": "b:2",
                                                       "discovery_type": "dns"}}]}


def test_nodes_are_filled_into_a_copy():
    store = data()
    kept = copy.deepcopy(store)
    assert service_names(store) == {"a:1", "b:2"}
    filled = with_nodes(store, {"a:1": [{"host": "10.0.0.1", "port": 1, "weight": 1}]})
    assert store == kept  # the store's own objects are never changed
    table = RouteTable(filled["stream_routes"], filled["upstreams"])
    assert [n.addr for n in table.upstreams["1"].nodes] == ["10.0.0.1:1"]
    assert table.routes[0].upstream.nodes == []
    assert table.routes[0].upstream.no_nodes() == "failed to set upstream: no valid upstream node"
    assert RouteTable([], store["upstreams"]).upstreams["3"].no_nodes() == (
        "failed to set upstream: discovery consul is uninitialized")


def test_config_follows_apisix_discovery_schema():
    cfg = Config({"discovery": {"dns": {"servers": ["127.0.0.1:8600"]}}})
    assert cfg.dns_discovery and cfg["discovery.dns.order"] == ["last", "SRV", "A", "AAAA",
                                                               "CNAME"]
    assert not Config({}).dns_discovery
    with pytest.raises(ConfigError, match="matches none"):
        Config({"discovery": {"dns": {"order": ["A"]}}})
    with pytest.raises(ConfigError, match="matches both"):
        Config({"discovery": {"dns": {"servers": ["127.0.0.1"], "resolv_conf": "r"}}})
    with pytest.raises(ConfigError, match="discovery.dns.servers"):
        Config({"discovery": {"dns": {"servers": ["dns.example:53"]}}})
    with pytest.raises(ConfigError, match="discovery.dns.order"):
        Config({"discovery": {"dns": {"servers": ["127.0.0.1"], "order": ["MX"]}}})


class Script:
    """A resolver that plays answers: ``(records, ttl)`` or an exception."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.asked = 0

    def resolve(self, host):
        self.asked += 1
        item = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(item, Exception):
            raise item
        return item


def test_watcher_keeps_the_last_good_answer_and_rebuilds_once_per_change(caplog, monkeypatch):
    monkeypatch.setattr(discovery, "MIN_TTL", 0.01)
    monkeypatch.setattr(discovery, "RETRY", 0.01)
    one = ([Record("10.0.0.1")], 0.01)
    two = ([Record("10.0.0.1"), Record("10.0.0.2")], 0.01)
    script = Script(one, one, DnsFailure("failed to query the DNS server: timeout"),
                    DnsFailure("failed to query the DNS server: timeout"), two)
    changes = []
    watcher = discovery.DnsDiscovery(script, lambda: changes.append(dict(watcher.found)))
    filled = watcher.apply(data())
    assert filled["upstreams"][0]["nodes"] == []  # nothing known yet
    watcher.prime(1)
    assert changes == [{"a:1": [{"host": "10.0.0.1", "port": 1, "weight": 1}],
                        "b:2": [{"host": "10.0.0.1", "port": 2, "weight": 1}]}]
    watcher.start()
    with gevent.Timeout(5):
        while len(changes) < 2:  # one, one, two failures (kept), then two nodes
            gevent.sleep(0.01)
    watcher.stop()
    assert len(changes[-1]["a:1"]) == 2
    assert "keeping the last good answer (1 nodes)" in caplog.text
    assert caplog.text.count("failed to query the DNS server: timeout") <= 2  # not per retry
    assert watcher.apply(data())["upstreams"][0]["nodes"] == changes[-1]["a:1"]


def test_no_answer_yet_and_a_name_no_longer_wanted(caplog):
    caplog.set_level(logging.ERROR)
    watcher = discovery.DnsDiscovery(Script(DnsFailure("down")), lambda: None)
    watcher.apply(data())
    watcher.prime(1)
    assert watcher.found == {} and "no answer yet" in caplog.text
    watcher.apply({"upstreams": [], "stream_routes": []})
    assert watcher.errors == {} and watcher._watchers == {}


def test_a_discovered_node_change_keeps_health_per_address():
    from gproxy.model.health import TCP_FAILURE
    from gproxy.proxy.health import HealthCheckers
    store = {"upstreams": [{"id": "1", "service_name": "a:1883", "discovery_type": "dns",
                            "checks": {"active": {"type": "tcp"},
                                       "passive": {"unhealthy": {"tcp_failures": 1}}}}],
             "stream_routes": []}
    node = lambda ip: {"host": ip, "port": 1883, "weight": 1}  # noqa: E731
    checkers = HealthCheckers()
    before = with_nodes(store, {"a:1883": [node("10.0.0.1"), node("10.0.0.2")]})
    table = RouteTable(before["stream_routes"], before["upstreams"])
    checkers.sync(table)
    table.upstreams["1"].health.report("10.0.0.2:1883", TCP_FAILURE, passive=True)
    assert table.upstreams["1"].health.unhealthy == {"10.0.0.2:1883"}
    after = with_nodes(store, {"a:1883": [node("10.0.0.1"), node("10.0.0.2"), node("10.0.0.3")]})
    swapped = RouteTable(after["stream_routes"], after["upstreams"])
    checkers.sync(swapped)
    health = swapped.upstreams["1"].health
    assert health.unhealthy == {"10.0.0.2:1883"} and "10.0.0.3:1883" in health.nodes
