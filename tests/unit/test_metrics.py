"""The metrics collector on a stats snapshot (no sockets), and the Grafana
dashboard in docs/ asking only for metrics gproxy exports."""

import json
import pathlib
import re

from prometheus_client.parser import text_string_to_metric_families

from gproxy.control.api import create_control_app
from gproxy.control.metrics import PATH, GproxyCollector, HttpCollector, create_metrics_app
from gproxy.proxy.sessions.registry import DIAL_BUCKETS, Registry

ROOT = pathlib.Path(__file__).resolve().parents[2]
HEALTH = [{"name": "/apisix/upstreams/1", "type": "tcp", "nodes": [
    {"ip": "10.0.0.1", "port": 1883, "status": "unhealthy",
     "counter": {"success": 0, "http_failure": 0, "tcp_failure": 2, "timeout_failure": 0}}]}]


def scrape(stats, health=HEALTH, path=PATH):
    app = create_metrics_app(GproxyCollector(lambda: stats, lambda: health, "9.9", DIAL_BUCKETS,
                                             hostname="h"))
    status = []
    body = b"".join(app({"PATH_INFO": path}, lambda s, h: status.append(s)))
    return status[0], body.decode()


def samples(text):
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_a_registry_s_counters_become_metrics():
    reg = Registry(worker="t")
    info = reg.new_session(("10.1.1.1", 5000), ("127.0.0.1", 9100))
    info.route_id = "1"
    reg.add(info)
    reg.set_node(info, "10.0.0.1:1883")
    reg.dialled("10.0.0.1:1883", 0.0007)
    reg.connect_failed("10.0.0.2:1883", "timeout")
    reg.reject("limit_rate")
    info.bytes_in, info.bytes_out = 100, 40
    status, text = scrape(reg.stats())
    got = samples(text)
    assert status == "200 OK"
    assert got[("apisix_stream_connection_total", (("route", "1"),))] == 1
    assert got[("gproxy_sessions", (("route", "1"),))] == 1
    assert got[("gproxy_node_sessions", (("node", "10.0.0.1:1883"),))] == 1
    assert got[("gproxy_rejected_total", (("reason", "limit_rate"),))] == 1
    assert got[("gproxy_upstream_connect_failures_total",
                (("node", "10.0.0.2:1883"), ("reason", "timeout")))] == 1
    assert got[("gproxy_upstream_connect_seconds_bucket", (("le", "0.0005"),))] == 0
    assert got[("gproxy_upstream_connect_seconds_bucket", (("le", "0.001"),))] == 1
    assert got[("gproxy_upstream_connect_seconds_count", ())] == 1
    assert got[("gproxy_bytes_total", (("direction", "in"),))] == 100
    assert got[("apisix_upstream_status", (("ip", "10.0.0.1"), ("name", "/apisix/upstreams/1"),
                                           ("port", "1883")))] == 0
    assert got[("apisix_node_info", (("hostname", "h"), ("version", "9.9")))] == 1
    assert scrape(reg.stats(), path="/metrics")[0].startswith("404")


def test_the_http_listeners_closes_and_open_connections_become_metrics():
    http = HttpCollector(lambda: {("admin", "reclaimed"): 700, ("metrics", "idle"): 2},
                         lambda: {"admin": {"waiting": 60, "busy": 4}})
    app = create_metrics_app(GproxyCollector(lambda: Registry().stats(), lambda: [], "9.9",
                                             DIAL_BUCKETS), [http])
    got = samples(b"".join(app({"PATH_INFO": PATH}, lambda s, h: None)).decode())
    assert got[("gproxy_http_connections_closed_total",
                (("listener", "admin"), ("reason", "reclaimed")))] == 700
    assert got[("gproxy_http_connections_closed_total",
                (("listener", "metrics"), ("reason", "idle")))] == 2
    assert got[("gproxy_http_connections", (("listener", "admin"), ("state", "waiting")))] == 60


def test_the_grafana_dashboard_asks_only_for_exported_metrics():
    _, text = scrape(Registry().stats())
    exported = {fam.name for fam in text_string_to_metric_families(text)}
    exported |= {"process_open_fds", "process_resident_memory_bytes"}
    dash = json.loads((ROOT / "docs" / "grafana-gproxy.json").read_text())
    wanted = set()
    for panel in dash["panels"]:
        for target in panel["targets"]:
            wanted |= set(re.findall(r"\b((?:apisix|gproxy|process)_[a-z_]+)", target["expr"]))
    base = {re.sub(r"_(bucket|count|sum|total)$", "", name) for name in wanted}
    assert wanted and base <= exported | {n + "_total" for n in exported} | exported


def test_control_api_shapes():
    app = create_control_app(lambda: HEALTH)

    def get(path, accept="application/json"):
        status = []
        body = b"".join(app({"PATH_INFO": path, "REQUEST_METHOD": "GET", "HTTP_ACCEPT": accept},
                            lambda s, h: status.append(s)))
        return status[0], body

    assert get("/v1/healthcheck") == ("200 OK", (json.dumps(HEALTH, separators=(",", ":"))
                                                 + "\n").encode())
    status, body = get("/v1/healthcheck/upstreams/1")
    assert status == "200 OK" and json.loads(body) == HEALTH[0]
    assert get("/v1/healthcheck/upstreams/9") == (
        "404 Not Found", b'{"error_msg":"upstreams[9] not found"}\n')
    assert get("/v1/healthcheck/consumers/1")[0] == "400 Bad Request"
    assert get("/v1/healthcheck/upstreams")[0] == "404 Not Found"
    status, body = get("/v1/healthcheck", "text/html,*/*")
    assert status == "200 OK" and b"APISIX upstream check status" in body and b"#FF0000" in body
