"""Prometheus metrics from a real gproxy (one process and --workers 2): APISIX's
stream names, live sessions, bytes, rejections, connect failures, the dial
histogram, all scraped at /apisix/prometheus/metrics on the export address."""

import pytest

from tests import packets
from tests.integration.conftest import HOST, free_port, mqtt_route, node, wait_until
from tests.integration.helpers import dial, expect_closed, raw_session

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


def sample(metrics, name, **labels):
    return metrics.get((name, frozenset(labels.items())), 0.0)


@pytest.mark.parametrize("workers", [1, 2])
def test_metrics_count_what_happened(mosquitto, gproxy, workers):
    broker = mosquitto()
    dead = free_port()
    route = mqtt_route([node(broker), node(dead)], level=4, type_="roundrobin")
    gp = gproxy([route], workers=workers)
    for i in range(6):
        raw_session(gp.port, "m-%d" % i)
    bad = dial(gp.port)
    bad.sendall(packets.connect(b"x", level=4, protocol_name="MQTX"))
    expect_closed(bad)
    bad.close()
    held = dial(gp.port)
    held.sendall(packets.connect_v311("held"))
    assert held.recv(4)

    def settled():
        m = gp.metrics()
        return m if sample(m, "gproxy_sessions", route="1") == 1 else None
    m = wait_until(settled, 5, 0.1)
    assert m, gp.metrics()
    assert sample(m, "apisix_stream_connection_total", route="1") == 8
    assert sample(m, "gproxy_sessions_total") == 8
    assert sample(m, "gproxy_node_sessions", node=broker.addr) == 1
    assert sample(m, "gproxy_rejected_total", reason="protocol_name") == 1
    failures = sample(m, "gproxy_upstream_connect_failures_total",
                      node="%s:%d" % (HOST, dead), reason="error")
    assert failures >= 1  # roundrobin sent some dials to the dead node first
    assert sample(m, "gproxy_upstream_connect_seconds_count") == 7
    assert sample(m, "gproxy_upstream_connect_seconds_bucket", le="+Inf") == 7
    assert sample(m, "gproxy_bytes_total", direction="in") >= 7 * 14
    assert sample(m, "gproxy_bytes_total", direction="out") >= 7 * 4
    assert any(name == "apisix_node_info" for name, _ in m)
    if workers > 1:
        assert sample(m, "gproxy_workers") == 2
    held.close()
