"""Health checks with real processes: active TCP and MQTT probes, passive checks
from real sessions, unhealthy nodes skipped and taken back, a SYN-dropping
node, health kept across route table swaps, and where operators see it
(control API, Admin API extension, metrics)."""

import time

import pytest

from tests.integration.conftest import HOST, mqtt_route, node, wait_until
from tests.integration.helpers import ApisixRing, SynDropper, raw_session

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

FAST = {"active": {"type": "tcp", "timeout": 1,
                   "healthy": {"interval": 1, "successes": 1},
                   "unhealthy": {"interval": 1, "tcp_failures": 1, "timeouts": 1}}}


def checked_route(targets, checks, route_id=1, **upstream):
    route = mqtt_route([node(t) for t in targets], route_id=route_id, level=4)
    route["upstream"]["checks"] = checks
    route["upstream"].update(upstream)
    return route


def status_of(gp, addr, name="/apisix/stream_routes/1"):
    code, body = gp.healthcheck()
    assert code == 200, body
    for checker in body:
        if checker["name"] == name:
            for n in checker["nodes"]:
                if "%s:%d" % (n["ip"], n["port"]) == addr:
                    return n["status"]
    return None


def wait_status(gp, addr, status, timeout=10, **kw):
    ok = wait_until(lambda: status_of(gp, addr, **kw) == status, timeout, 0.1)
    assert ok, "node %s never became %s; control API: %s" % (addr, status, gp.healthcheck())


def ids_for(ring, addr, n=5):
    out = [cid for cid in ("client-%d" % i for i in range(500)) if ring.pick(cid) == addr]
    return out[:n]


def test_active_tcp_checks_take_a_dead_broker_out_and_back(mosquitto, gproxy):
    a, b = mosquitto("a"), mosquitto("b")
    gp = gproxy([checked_route([a, b], FAST)])
    wait_status(gp, a.addr, "healthy")
    wait_status(gp, b.addr, "healthy")
    code, one = gp.healthcheck("/stream_routes/1")
    assert code == 200 and one["type"] == "tcp" and len(one["nodes"]) == 2
    on_b = ids_for(ApisixRing([(a.host, a.port, 1), (b.host, b.port, 1)]), b.addr)
    b.stop()
    wait_status(gp, b.addr, "unhealthy")
    mark = gp.mark()
    for cid in on_b:  # their node is down: straight to a, no failed dial
        raw_session(gp.port, cid)
        a.wait_for_client(cid)
    assert not gp.find("connect() failed", since=mark)
    b.start()
    wait_status(gp, b.addr, "healthy")
    since = b.log.mark()
    raw_session(gp.port, on_b[0])
    b.wait_for_client(on_b[0], since=since)
    # the Admin API extension (what the dashboard reads) and the metrics agree
    code, body = gp.admin("GET", "/gproxy/health")
    assert code == 200 and body["total"] == 1
    assert {n["status"] for n in body["list"][0]["nodes"]} == {"healthy"}
    metrics = gp.metrics()
    key = ("apisix_upstream_status", frozenset({"name": "/apisix/stream_routes/1", "ip": HOST,
                                                "port": str(b.port)}.items()))
    assert metrics[key] == 1.0


def test_a_syn_dropping_node_costs_a_reconnect_nothing_once_marked_down(mosquitto, gproxy):
    good = mosquitto("good")
    black_hole = SynDropper()
    try:
        ring = ApisixRing([(HOST, black_hole.port, 1), (good.host, good.port, 1)])
        on_hole = ids_for(ring, black_hole.addr, 3)
        gp = gproxy([checked_route([black_hole, good], FAST,
                                   timeout={"connect": 3, "send": 60, "read": 60})])
        wait_status(gp, black_hole.addr, "unhealthy")
        for cid in on_hole:
            started = time.monotonic()
            raw_session(gp.port, cid)
            assert time.monotonic() - started < 1.0  # no connect timeout paid
            good.wait_for_client(cid)
        code, body = gp.healthcheck()
        counter = [n for n in body[0]["nodes"] if n["port"] == black_hole.port][0]["counter"]
        assert counter["timeout_failure"] >= 1
    finally:
        black_hole.close()


def test_without_checks_a_syn_dropping_node_costs_the_connect_timeout(mosquitto, gproxy):
    """The same set-up without ``checks``: each such reconnect waits for the timeout."""
    good = mosquitto("good")
    black_hole = SynDropper()
    try:
        ring = ApisixRing([(HOST, black_hole.port, 1), (good.host, good.port, 1)])
        cid = ids_for(ring, black_hole.addr, 1)[0]
        route = mqtt_route([node(black_hole), node(good)], level=4)
        route["upstream"]["timeout"] = {"connect": 1.5, "send": 60, "read": 60}
        gp = gproxy([route])
        started = time.monotonic()
        raw_session(gp.port, cid)
        assert time.monotonic() - started >= 1.4
        gp.wait_for_log("connect() failed (110: Connection timed out)")
    finally:
        black_hole.close()


def test_mqtt_probe_sees_a_broker_that_takes_tcp_but_never_answers(sink, mosquitto, gproxy):
    good = mosquitto("good")
    mqtt_checks = {"active": dict(FAST["active"], type="mqtt",
                                  mqtt={"protocol_level": 4, "client_id": "gp-probe"})}
    tcp_checked = checked_route([sink, good], FAST, route_id=2)
    tcp_checked["server_port"] = 1  # never matched: only its checker runs
    gp = gproxy([checked_route([sink, good], mqtt_checks, route_id=1), tcp_checked])
    wait_status(gp, sink.addr, "unhealthy")
    wait_status(gp, good.addr, "healthy")
    good.wait_for_client("gp-probe")  # the probe did a whole CONNECT
    assert "gp-probe disconnected." in good.log.wait_for("Client gp-probe disconnected")
    # the TCP probe of the same node (another route) thinks it is fine
    wait_status(gp, sink.addr, "healthy", name="/apisix/stream_routes/2")


def test_passive_checks_mark_a_node_down_from_real_dials(mosquitto, gproxy):
    a, b = mosquitto("a"), mosquitto("b")
    checks = {"active": {"type": "tcp", "healthy": {"interval": 3600},
                         "unhealthy": {"interval": 3600}},
              "passive": {"type": "tcp", "unhealthy": {"tcp_failures": 1}}}
    gp = gproxy([checked_route([a, b], checks)])
    wait_status(gp, b.addr, "healthy")
    on_b = ids_for(ApisixRing([(a.host, a.port, 1), (b.host, b.port, 1)]), b.addr, 3)
    b.stop()
    mark = gp.mark()
    raw_session(gp.port, on_b[0])  # fails over to a, and counts against b
    assert len(gp.find("connect() failed", since=mark)) == 1
    wait_status(gp, b.addr, "unhealthy", timeout=2)
    raw_session(gp.port, on_b[1])
    raw_session(gp.port, on_b[2])
    assert len(gp.find("connect() failed", since=mark)) == 1  # b is skipped now


def test_a_route_table_swap_keeps_health(mosquitto, gproxy):
    a, b = mosquitto("a"), mosquitto("b")
    slow_recheck = {"active": dict(FAST["active"], unhealthy={"interval": 3600,
                                                              "tcp_failures": 1})}
    gp = gproxy([checked_route([a, b], slow_recheck)])
    b.stop()
    wait_status(gp, b.addr, "unhealthy")
    code, _ = gp.admin("PUT", "/stream_routes/99", {"server_port": 1, "upstream": {
        "type": "roundrobin", "nodes": {a.addr: 1}}})
    assert code == 201
    assert status_of(gp, b.addr) == "unhealthy"  # not reset by the swap


def test_every_node_unhealthy_tries_them_all(mosquitto, gproxy):
    a, b = mosquitto("a"), mosquitto("b")
    slow = {"active": dict(FAST["active"], unhealthy={"interval": 3600, "tcp_failures": 1})}
    gp = gproxy([checked_route([a, b], slow)])
    a.stop()
    b.stop()
    wait_status(gp, a.addr, "unhealthy")
    wait_status(gp, b.addr, "unhealthy")
    b.start()  # back, but the checker will not look for an hour
    raw_session(gp.port, "anyone")
    b.wait_for_client("anyone")


def test_workers_merge_their_health_in_the_control_api(mosquitto, gproxy):
    a, b = mosquitto("a"), mosquitto("b")
    gp = gproxy([checked_route([a, b], FAST)], workers=2)
    b.stop()
    wait_status(gp, b.addr, "unhealthy")
    code, body = gp.healthcheck()
    node_b = [n for n in body[0]["nodes"] if n["port"] == b.port][0]
    assert node_b["counter"]["tcp_failure"] >= 2  # both workers probed and counted
