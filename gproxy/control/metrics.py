"""Prometheus metrics, collected at scrape time from the registry's counters.

Nothing here runs on the data path: the registry keeps plain integers as
sessions start, change and end, and ``GproxyCollector.collect()`` turns one
``stats()`` snapshot (one process's, or a ``--workers`` parent's sum of all
workers') and one health report into metric families.  Names follow APISIX's
where it has them (``apisix/plugins/prometheus/exporter.lua``):

* ``apisix_stream_connection_total{route}``: sessions that matched a route;
* ``apisix_upstream_status{name,ip,port}``: 1 healthy, 0 unhealthy (checked
  upstreams only);
* ``apisix_node_info{hostname,version}``;

and gproxy's own: live sessions per route, node and state, bytes each way,
rejected connections by reason, upstream connect failures per node, the dial
latency histogram, sessions since start, worker count; and, from
``HttpCollector``, the HTTP listeners' open connections by state and the ones
gproxy closed by reason (an idle or slowloris flood shows there).  Served as
Prometheus text at ``/apisix/prometheus/metrics`` (APISIX's path) by
``create_metrics_app``.
"""

import platform

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

PATH = "/apisix/prometheus/metrics"


def _buckets(stats, bounds):
    """Cumulative ``[(le, count), ...]`` from the registry's per-bucket counts."""
    counts = stats.get("dial_buckets") or {}
    out, total = [], 0
    for i, bound in enumerate(bounds):
        total += counts.get(str(i), 0)
        out.append((repr(float(bound)), total))
    total += counts.get(str(len(bounds)), 0)
    out.append(("+Inf", total))
    return out, total


class GproxyCollector:
    """Reads ``stats()`` and ``health()`` once per scrape."""

    def __init__(self, stats, health, version, dial_buckets, hostname=None):
        self.stats = stats
        self.health = health
        self.version = version
        self.dial_bounds = dial_buckets
        self.hostname = hostname or platform.node()

    def collect(self):
        st = self.stats()
        yield from self._apisix(st)
        yield from self._sessions(st)
        yield from self._upstreams(st)

    def _apisix(self, st):
        info = GaugeMetricFamily("apisix_node_info", "Info of APISIX node",
                                 labels=["hostname", "version"])
        info.add_metric([self.hostname, self.version], 1)
        yield info
        conns = CounterMetricFamily("apisix_stream_connection_total",
                                    "Total number of connections handled per stream route "
                                    "in APISIX", labels=["route"])
        for route, n in sorted((st.get("route_total") or {}).items()):
            conns.add_metric([route], n)
        yield conns
        status = GaugeMetricFamily("apisix_upstream_status",
                                   "Upstream status from health check",
                                   labels=["name", "ip", "port"])
        for checker in self.health():
            for node in checker["nodes"]:
                up = node["status"] in ("healthy", "mostly_healthy")
                status.add_metric([checker["name"], node["ip"], str(node["port"])], int(up))
        yield status

    def _sessions(self, st):
        live = GaugeMetricFamily("gproxy_sessions", "Live sessions per stream route",
                                 labels=["route"])
        for route, n in sorted((st.get("per_route") or {}).items()):
            live.add_metric([str(route)], n)
        yield live
        per_state = GaugeMetricFamily("gproxy_sessions_by_state", "Live sessions per state",
                                      labels=["state"])
        for state, n in sorted((st.get("per_state") or {}).items()):
            per_state.add_metric([state], n)
        yield per_state
        yield CounterMetricFamily("gproxy_sessions_total",
                                  "Sessions that matched a route since start",
                                  value=st.get("sessions_total", 0))
        rejected = CounterMetricFamily("gproxy_rejected_total",
                                       "Connections refused before proxying, by reason",
                                       labels=["reason"])
        for reason, n in sorted((st.get("rejected") or {}).items()):
            rejected.add_metric([reason], n)
        yield rejected
        nbytes = CounterMetricFamily("gproxy_bytes_total",
                                     "Bytes relayed: in = client to broker, out = broker "
                                     "to client", labels=["direction"])
        nbytes.add_metric(["in"], st.get("bytes_in", 0))
        nbytes.add_metric(["out"], st.get("bytes_out", 0))
        yield nbytes
        if "workers" in st:
            yield GaugeMetricFamily("gproxy_workers", "Worker processes answering",
                                    value=st["workers"])

    def _upstreams(self, st):
        per_node = GaugeMetricFamily("gproxy_node_sessions", "Live sessions per upstream node",
                                     labels=["node"])
        for node, n in sorted((st.get("per_node") or {}).items()):
            per_node.add_metric([node], n)
        yield per_node
        failures = CounterMetricFamily("gproxy_upstream_connect_failures_total",
                                       "Failed dials to upstream nodes",
                                       labels=["node", "reason"])
        for key, n in sorted((st.get("connect_failures") or {}).items()):
            node, _, reason = key.rpartition(" ")
            failures.add_metric([node, reason], n)
        yield failures
        buckets, _ = _buckets(st, self.dial_bounds)
        yield HistogramMetricFamily("gproxy_upstream_connect_seconds",
                                    "Time to connect to the chosen node (successful dials)",
                                    buckets=buckets, sum_value=st.get("dial_sum", 0.0))


class HttpCollector:
    """The HTTP listeners (admin, control, metrics): ``closed()`` gives
    ``{(listener, reason): count}`` since start, ``open_()`` ``{listener: {state: n}}``."""

    def __init__(self, closed, open_):
        self.closed = closed
        self.open_ = open_

    def collect(self):
        closed = CounterMetricFamily(
            "gproxy_http_connections_closed_total", "HTTP connections gproxy closed: idle, "
            "request_timeout, send_timeout, reclaimed (at the cap), bad_request, tls_handshake",
            labels=["listener", "reason"])
        for (listener, reason), n in sorted(self.closed().items()):
            closed.add_metric([listener, reason], n)
        yield closed
        now = GaugeMetricFamily("gproxy_http_connections", "Open HTTP connections by state",
                                labels=["listener", "state"])
        for listener, states in sorted(self.open_().items()):
            for state, n in sorted(states.items()):
                now.add_metric([listener, state], n)
        yield now


def create_metrics_app(collector, extra_collectors=()):
    """A WSGI app serving the collector's metrics as Prometheus text at ``PATH``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    for extra in extra_collectors:
        registry.register(extra)

    def app(environ, start_response):
        if environ.get("PATH_INFO", "").rstrip("/") != PATH:
            data = b"not found\n"
            start_response("404 Not Found", [("Content-Type", "text/plain"),
                                             ("Content-Length", str(len(data)))])
            return [data]
        data = generate_latest(registry)
        start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST),
                                  ("Content-Length", str(len(data)))])
        return [data]

    return app
