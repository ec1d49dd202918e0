"""Pure parts of health checks and limits: thresholds, statuses, balancer skips,
the workers' merge, limit-conn's delay arithmetic, the rate limit's bucket,
the checks and plugin schemas, and the probe's CONNECT/CONNACK bytes."""

import pytest

from gproxy.errors import MalformedPacket, SchemaError
from gproxy.model.balancer import Balancer, Node
from gproxy.model.health import (SUCCESS, TCP_FAILURE, TIMEOUT, Checks, HealthState,
                                 merge_reports)
from gproxy.model.limits import RateLimit, conn_delay
from gproxy.model.resources import check_stream_route, check_upstream
from gproxy.model.routes import RouteTable
from gproxy.protocols import mqttstream
from tests import packets as P

A, B, C = Node("10.0.0.1", 1883), Node("10.0.0.2", 1883), Node("10.0.0.3", 1883)


def state(checks=None, nodes=(A, B, C)):
    return HealthState("/apisix/upstreams/1", Checks(checks or {"active": {"type": "tcp"}}),
                       nodes)


# -- thresholds and statuses ---------------------------------------------------------

def test_defaults_are_apisix_s():
    checks = Checks({"active": {}, "passive": {}})
    assert (checks.threshold(TCP_FAILURE, False), checks.threshold(TIMEOUT, False),
            checks.threshold(SUCCESS, False)) == (2, 3, 2)
    assert (checks.threshold(TCP_FAILURE, True), checks.threshold(TIMEOUT, True),
            checks.threshold(SUCCESS, True)) == (2, 7, 5)
    assert checks.interval(True) == checks.interval(False) == 1
    assert checks.type == "http" and checks.probe == "tcp"  # no HTTP on a stream
    assert Checks({"active": {"type": "mqtt"}}).probe == "mqtt"


def test_a_node_goes_down_after_tcp_failures_and_comes_back_after_successes():
    st = state()
    assert st.report(A.addr, TCP_FAILURE) is None
    assert st.as_dict()["nodes"][0]["status"] == "mostly_healthy"
    assert st.report(A.addr, TCP_FAILURE) == "unhealthy"
    assert st.unhealthy == {A.addr}
    assert st.report(A.addr, TCP_FAILURE) is None  # failures don't count while down
    assert st.report(A.addr, SUCCESS) is None
    assert st.as_dict()["nodes"][0]["status"] == "mostly_unhealthy"
    assert st.report(A.addr, SUCCESS) == "healthy"
    assert st.unhealthy == set()


def test_a_success_clears_failures_and_a_failure_clears_successes():
    st = state()
    st.report(A.addr, TIMEOUT)
    st.report(A.addr, TIMEOUT)
    st.report(A.addr, SUCCESS)  # healthy: clears the two timeouts
    st.report(A.addr, TIMEOUT)
    st.report(A.addr, TIMEOUT)
    assert st.is_healthy(A.addr)
    assert st.report(A.addr, TIMEOUT) == "unhealthy"  # 3 in a row
    st.report(A.addr, SUCCESS)
    st.report(A.addr, TCP_FAILURE)  # clears the success
    assert st.report(A.addr, SUCCESS) is None
    assert not st.is_healthy(A.addr)


def test_a_zero_threshold_disables_that_kind_and_passive_uses_its_own():
    st = state({"active": {"unhealthy": {"tcp_failures": 5}},
                "passive": {"unhealthy": {"tcp_failures": 0, "timeouts": 1}}})
    for _ in range(3):
        assert st.report(A.addr, TCP_FAILURE, passive=True) is None
    assert st.report(A.addr, TIMEOUT, passive=True) == "unhealthy"
    no_passive = state({"active": {}})
    assert no_passive.report(A.addr, TIMEOUT, passive=True) is None


def test_the_report_has_the_control_api_shape():
    st = state(nodes=(A, Node("10.0.0.9", 80, domain="b.example")))
    st.report(A.addr, TCP_FAILURE)
    assert st.as_dict() == {"name": "/apisix/upstreams/1", "type": "tcp", "nodes": [
        {"ip": "10.0.0.1", "port": 1883, "status": "mostly_healthy", "counter": {
            "success": 0, "http_failure": 0, "tcp_failure": 1, "timeout_failure": 0}},
        {"ip": "10.0.0.9", "port": 80, "status": "healthy", "hostname": "b.example",
         "counter": {"success": 0, "http_failure": 0, "tcp_failure": 0, "timeout_failure": 0}}]}


def test_a_new_node_list_keeps_the_health_of_nodes_still_there():
    st = state()
    st.report(A.addr, TCP_FAILURE)
    st.report(A.addr, TCP_FAILURE)
    st.report(C.addr, TCP_FAILURE)
    st.report(C.addr, TCP_FAILURE)
    st.set_nodes([A, B])
    assert st.unhealthy == {A.addr} and set(st.nodes) == {A.addr, B.addr}


def test_workers_reports_merge():
    up = {"ip": "10.0.0.1", "port": 1883, "status": "healthy",
          "counter": {"success": 1, "http_failure": 0, "tcp_failure": 0, "timeout_failure": 0}}
    down = dict(up, status="unhealthy", counter=dict(up["counter"], tcp_failure=2))
    one = [{"name": "/apisix/upstreams/1", "type": "tcp", "nodes": [up]}]
    two = [{"name": "/apisix/upstreams/1", "type": "tcp", "nodes": [down]}]
    assert merge_reports([one]) == one
    merged = merge_reports([one, one, two])
    node = merged[0]["nodes"][0]
    assert node["status"] == "mostly_healthy"
    assert node["counter"] == {"success": 3, "http_failure": 0, "tcp_failure": 2,
                               "timeout_failure": 0}
    assert merge_reports([two, two, one])[0]["nodes"][0]["status"] == "mostly_unhealthy"


# -- balancers skip unhealthy nodes ----------------------------------------------------

@pytest.mark.parametrize("kind", ["roundrobin", "chash"])
def test_balancers_skip_unhealthy_nodes(kind):
    bal = Balancer([A, B, C], kind)
    for key in (b"k%d" % i for i in range(50)):
        got = list(bal.candidates(key, 3, {B.addr}))
        assert B not in got and sorted(n.addr for n in got) == sorted([A.addr, C.addr])


def test_chash_walks_on_along_the_ring_past_an_unhealthy_node():
    """A key whose node is down goes where it would if that node had been
    tried and failed (the next node on the ring), so it is stable."""
    bal = Balancer([A, B, C], "chash")
    for key in (b"client-%d" % i for i in range(200)):
        order = list(bal.candidates(key, 3))
        if order[0] == B:
            assert list(bal.candidates(key, 3, {B.addr}))[0] == order[1]
        else:
            assert list(bal.candidates(key, 3, {B.addr}))[0] == order[0]


def test_when_every_node_is_unhealthy_all_are_tried():
    bal = Balancer([A, B], "roundrobin")
    assert len(list(bal.candidates(None, 2, {A.addr, B.addr}))) == 2
    assert list(Balancer([A], "chash").candidates(b"x", 1, {A.addr})) == [A]


def test_the_retry_budget_counts_only_nodes_dialled():
    bal = Balancer([A, B, C], "roundrobin")
    assert len(list(bal.candidates(None, 1, {A.addr}))) == 1
    assert len(list(bal.candidates(None, 5, {A.addr}))) == 2


def test_checked_upstreams_are_named_like_apisix_keys():
    checks = {"active": {"type": "tcp"}}
    nodes = {"10.0.0.1:1883": 1, "10.0.0.2:1883": 1}
    table = RouteTable(
        [{"id": 7, "upstream": {"nodes": nodes, "checks": checks}},
         {"id": 8, "upstream": {"nodes": {"10.0.0.1:1883": 1}, "checks": checks}},  # one node
         {"id": 9, "upstream_id": 1}],
        [{"id": 1, "nodes": nodes, "checks": checks}, {"id": 2, "nodes": nodes}])
    assert sorted(table.checked_upstreams()) == ["/apisix/stream_routes/7",
                                                 "/apisix/upstreams/1"]


# -- schemas ----------------------------------------------------------------------------

UP = {"nodes": {"127.0.0.1:1883": 1, "127.0.0.1:1884": 1}}


@pytest.mark.parametrize("checks", [
    {"active": {"type": "tcp", "timeout": 2, "healthy": {"interval": 1, "successes": 1},
                "unhealthy": {"interval": 1, "tcp_failures": 1, "timeouts": 2}},
     "passive": {"type": "tcp", "healthy": {"successes": 0},
                 "unhealthy": {"tcp_failures": 3, "timeouts": 0}}},
    {"active": {"type": "mqtt", "mqtt": {"protocol_level": 5, "client_id": "hc"}}},
    {"active": {}},
])
def test_checks_accepted(checks):
    check_upstream(dict(UP, checks=checks))
    check_stream_route({"upstream": dict(UP, checks=checks)})


@pytest.mark.parametrize("checks, error", [
    ({"passive": {}}, "object matches none of the required"),
    ({"active": {"type": "udp"}}, 'property "type" validation failed'),
    ({"active": {"healthy": {"interval": 0}}}, 'property "interval" validation failed'),
    ({"active": {"unhealthy": {"tcp_failures": 255}}}, 'property "tcp_failures"'),
    ({"active": {}, "extra": 1}, "additional properties forbidden"),
    ({"active": {"mqtt": {"protocol_level": 6}}}, 'property "protocol_level"'),
])
def test_checks_refused(checks, error):
    with pytest.raises(SchemaError, match=error):
        check_upstream(dict(UP, checks=checks))


@pytest.mark.parametrize("plugins, error", [
    ({"limit-conn": {"conn": 1, "burst": 0, "default_conn_delay": 0.1, "key": "remote_addr"}},
     None),
    ({"limit-conn": {"conn": 1, "burst": 0, "key": "remote_addr"}},
     'property "default_conn_delay" is required'),
    ({"limit-conn": {"conn": 0, "burst": 0, "default_conn_delay": 1, "key": "remote_addr"}},
     'property "conn" validation failed'),
    ({"limit-conn": {"conn": 1, "burst": 0, "default_conn_delay": 1, "key": "consumer"}},
     'property "key" validation failed'),
    ({"gproxy-limit-rate": {"rate": 100, "burst": 50}}, None),
    ({"gproxy-limit-rate": {"rate": 0}}, 'property "rate" validation failed'),
    ({"gproxy-limit-rate": {"rate": 1, "key": "remote_addr", "nodelay": True}},
     "additional properties forbidden"),
])
def test_limit_plugin_schemas(plugins, error):
    route = {"plugins": plugins, "upstream": UP}
    if error is None:
        check_stream_route(route)
    else:
        with pytest.raises(SchemaError, match=error):
            check_stream_route(route)


# -- limit arithmetic -------------------------------------------------------------------

def test_limit_conn_delays_the_burst_and_rejects_beyond_it():
    conf = {"conn": 2, "burst": 3, "default_conn_delay": 0.5}
    assert [conn_delay(n, conf) for n in range(1, 7)] == [0.0, 0.0, 0.5, 0.5, 1.0, None]


def test_rate_limit_is_nginx_limit_req_with_nodelay():
    rl = RateLimit(rate=2, burst=1)
    assert [rl.allow("k", 0.0) for _ in range(3)] == [True, True, False]
    assert rl.allow("k", 0.5) is True  # one drained at 2/s
    assert rl.allow("k", 0.5) is False
    assert rl.allow("other", 0.5) is True  # keys are independent
    assert all(rl.allow("k", 10.0 + i) for i in range(5))  # one a second is always fine


def test_rate_limit_forgets_keys_as_they_drain():
    """A key's bucket is empty (burst + 1) / rate seconds after its last
    session: the table shrinks back as clients go quiet, a few keys a call."""
    rl = RateLimit(rate=10, burst=1)  # a bucket drains in 0.2 s
    for i in range(1000):
        assert rl.allow("10.0.%d.%d" % divmod(i, 256), i * 0.0001)  # 1,000 clients in 0.1 s
    assert len(rl.buckets) == 1000
    for i in range(200):  # later, one client keeps coming
        rl.allow("regular", 1.0 + i * 0.1)
    assert set(rl.buckets) == {"regular"}


def test_forgetting_a_drained_key_changes_no_answer():
    kept, pruned = RateLimit(rate=2, burst=1), RateLimit(rate=2, burst=1)
    pruned.EXPIRE_EACH = 10 ** 6
    times = [0.0, 0.1, 0.2, 1.0, 1.05, 1.1, 2.5, 2.6, 2.61, 5.0]
    for t in times:
        assert kept.allow("k", t) == pruned.allow("k", t)
        pruned.allow("other-%s" % t, t)


def test_rate_limit_keeps_at_most_max_keys_least_recently_used_going_first():
    rl = RateLimit(rate=0.001)  # buckets that take 1,000 s to drain
    rl.MAX_KEYS = 100
    for i in range(1000):
        rl.allow(i, float(i))
    assert len(rl.buckets) == 100 and next(iter(rl.buckets)) == 900


def test_route_buckets_are_replaced_on_a_new_rate_and_forgotten_once_drained():
    from gproxy.proxy.session.limits import Limits
    limits = Limits()
    for rate in range(1, 1001):  # a route edited 1,000 times
        limits.bucket("r1", {"rate": rate}, 0.0).allow("k", 0.0)
    assert list(limits.rates) == ["r1"] and limits.rates["r1"].rate == 1000
    for i in range(50):  # 50 routes, each used once, then deleted
        limits.bucket("gone-%d" % i, {"rate": 10}, 1.0).allow("k", 1.0)
    for i in range(30):  # later only r2 is used
        limits.bucket("r2", {"rate": 10}, 10.0 + i)
    assert list(limits.rates) == ["r2"]


# -- the MQTT probe's bytes -------------------------------------------------------------

@pytest.mark.parametrize("level", [3, 4, 5])
def test_probe_connect_matches_the_independent_builder(level):
    got = mqttstream.connect("hc", level, 0)
    P.assert_packet(got, P.connect(b"hc", level=level, keepalive=0), "probe CONNECT")


def test_probe_connect_with_credentials():
    got = mqttstream.connect("hc", 4, 0, "alice", "pw")
    P.assert_packet(got, P.connect(b"hc", level=4, keepalive=0, username="alice",
                                   password=b"pw"), "probe CONNECT with credentials")


@pytest.mark.parametrize("data, code", [
    (b"", None), (b"\x20", None), (b"\x20\x02\x00", None), (b"\x20\x02\x00\x00", 0),
    (b"\x20\x02\x01\x05", 5), (b"\x20\x03\x00\x87\x00", 0x87)])
def test_connack_code(data, code):
    assert mqttstream.connack_code(data) == code


def test_connack_code_refuses_other_packets():
    with pytest.raises(MalformedPacket):
        mqttstream.connack_code(b"\x30\x02\x00\x00")


def test_a_node_that_came_due_during_a_round_is_probed_next_round():
    from gproxy.proxy.health import LOOK_EVERY, next_round_in
    inf = float("inf")
    # b came due while a's probe ran; a is down and looked at hourly: probe b now
    assert next_round_in([100.0 + 3600, 99.5], now=100.0) == 0.0
    assert next_round_in([100.0 + 3600, 100.25], now=100.0) == 0.25
    assert next_round_in([100.0 + 3600], now=100.0) == LOOK_EVERY  # new nodes: within 1 s
    assert next_round_in([inf, inf], now=100.0) == LOOK_EVERY
    assert next_round_in([], now=100.0) == LOOK_EVERY


@pytest.mark.parametrize("concurrency, probes", [(None, 10), (0, 1), (-5, 1), (3, 3),
                                                 (2 ** 63, 1024)])
def test_any_concurrency_the_schema_takes_makes_a_pool(concurrency, probes):
    """``active.concurrency`` is an integer with no bound (APISIX's schema): a
    huge one crashed the checker's greenlet with a traceback (found by fuzzing)."""
    from gevent.pool import Pool
    from gproxy.proxy.health import probes_at_once
    active = dict(Checks({"active": {"type": "tcp"}}).active)
    if concurrency is not None:
        active["concurrency"] = concurrency
    assert probes_at_once(active) == probes
    Pool(probes_at_once(active))


def test_integral_floats_from_json_make_a_ring_and_a_probe_port():
    """``2.0`` passes the schema's ``integer`` (Lua has one number type); the ring
    and the socket need ints (found by fuzzing: a TypeError building the ring, and
    one per health probe of ``active.port: 80.0``)."""
    table = RouteTable([{"id": 1, "upstream": {
        "type": "chash", "key": "mqtt_client_id",
        "nodes": [{"host": "127.0.0.1", "port": 1000.0, "weight": 2.0, "priority": 0.0},
                  {"host": "127.0.0.2", "port": 1000, "weight": 1}]}}], [])
    (route,) = table.routes
    nodes = route.upstream.balancer(None).nodes
    assert [(type(n.port), type(n.weight)) for n in nodes] == [(int, int)] * 2
