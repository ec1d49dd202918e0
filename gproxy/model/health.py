"""Node health as APISIX's upstream ``checks`` define it: settings, state, counters.

APISIX checks stream upstreams with lua-resty-healthcheck
(docs/apisix-behaviour.md §5.1, §5.3 item 5).  ``Checks`` reads an
upstream's ``checks`` with APISIX's defaults; ``HealthState`` keeps one
upstream's nodes as healthy or unhealthy from reports of probe outcomes
(``active``) and of real sessions' dials (``passive``):

* a success counts towards ``healthy.successes`` only while a node is
  unhealthy, a failure (``tcp_failure`` / ``timeout``) towards
  ``unhealthy.tcp_failures`` / ``unhealthy.timeouts`` only while it is healthy;
  counting one kind clears the opposite kind, and a threshold of 0 disables it;
* the status shown is ``healthy``/``unhealthy``, or ``mostly_healthy`` /
  ``mostly_unhealthy`` while counts towards a change are pending, as the
  control API reports them.

``unhealthy`` (a set of ``host:port``) is what balancers skip.  Pure: the
probing itself (sockets, timers) lives in ``gproxy.proxy.health``.
"""

SUCCESS, TCP_FAILURE, TIMEOUT = "success", "tcp_failure", "timeout"
#: APISIX's defaults (schema_def.lua health_checker).
ACTIVE = {"type": "http", "timeout": 1, "concurrency": 10,
          "healthy": {"interval": 1, "successes": 2},
          "unhealthy": {"interval": 1, "tcp_failures": 2, "timeouts": 3}}
PASSIVE = {"healthy": {"successes": 5},
           "unhealthy": {"tcp_failures": 2, "timeouts": 7}}
#: gproxy's MQTT-level probe (``active.type: mqtt``, an extension).
MQTT_PROBE = {"protocol_level": 4, "client_id": "gproxy-health-check"}


def _merged(defaults, conf):
    out = dict(defaults)
    for key, value in (conf or {}).items():
        if isinstance(value, dict) and isinstance(defaults.get(key), dict):
            out[key] = _merged(defaults[key], value)
        else:
            out[key] = value
    return out


class Checks:
    """An upstream's ``checks`` with defaults filled in.

    ``probe`` is what the active checker does: ``tcp`` (connect, close) or
    ``mqtt`` (CONNECT, wait for CONNACK, DISCONNECT).  A stream upstream has
    no HTTP to speak, so ``http``/``https`` (APISIX's default type) probe
    with a TCP connect too.
    """

    def __init__(self, conf):
        self.conf = conf
        self.active = _merged(ACTIVE, conf["active"]) if conf.get("active") is not None else None
        self.passive = (_merged(PASSIVE, conf["passive"]) if conf.get("passive") is not None
                        else None)
        kind = (self.active or self.passive or {}).get("type") or "http"
        self.type = kind  # as APISIX's control API reports it
        self.probe = "mqtt" if kind == "mqtt" else "tcp"
        self.mqtt = _merged(MQTT_PROBE, (self.active or {}).get("mqtt"))

    def threshold(self, outcome, passive):
        """How many reports of ``outcome`` in a row change a node's status (0: never)."""
        conf = self.passive if passive else self.active
        if conf is None:
            return 0
        if outcome == SUCCESS:
            return conf["healthy"].get("successes", 0)
        key = "tcp_failures" if outcome == TCP_FAILURE else "timeouts"
        return conf["unhealthy"].get(key, 0)

    def interval(self, healthy):
        """Seconds between active probes of a healthy (or unhealthy) node; 0: none."""
        if self.active is None:
            return 0
        return self.active["healthy" if healthy else "unhealthy"].get("interval", 0)


class NodeHealth:
    """One node's status and counters (the control API's ``counter``)."""

    __slots__ = ("host", "port", "domain", "healthy", "success", "tcp_failure",
                 "timeout_failure")

    def __init__(self, host, port, domain=None):
        self.host = host
        self.port = port
        self.domain = domain
        self.healthy = True
        self.success = self.tcp_failure = self.timeout_failure = 0

    @property
    def status(self):
        if self.healthy:
            return "mostly_healthy" if self.tcp_failure or self.timeout_failure else "healthy"
        return "mostly_unhealthy" if self.success else "unhealthy"

    def as_dict(self):
        out = {"ip": self.host.strip("[]"), "port": self.port, "status": self.status,
               "counter": {"success": self.success, "http_failure": 0,
                           "tcp_failure": self.tcp_failure,
                           "timeout_failure": self.timeout_failure}}
        if self.domain:
            out["hostname"] = self.domain
        return out


class HealthState:
    """The health of one upstream's nodes, keyed by ``host:port``."""

    def __init__(self, name, checks, nodes=()):
        self.name = name  # "/apisix/upstreams/1" or "/apisix/stream_routes/1"
        self.checks = checks
        self.nodes = {}
        self.unhealthy = set()
        self.set_nodes(nodes)

    def set_nodes(self, nodes):
        """Follow the upstream's node list; nodes already known keep their health."""
        wanted = {node.addr: node for node in nodes}
        for addr in list(self.nodes):
            if addr not in wanted:
                del self.nodes[addr]
                self.unhealthy.discard(addr)
        for addr, node in wanted.items():
            if addr not in self.nodes:
                self.nodes[addr] = NodeHealth(node.host, node.port, node.domain)

    def is_healthy(self, addr):
        return addr not in self.unhealthy

    def report(self, addr, outcome, passive=False):
        """Count one outcome for ``addr``; returns the new status if it changed."""
        node = self.nodes.get(addr)
        limit = self.checks.threshold(outcome, passive)
        if node is None or not limit:
            return None
        if outcome == SUCCESS:
            if node.healthy:
                node.tcp_failure = node.timeout_failure = 0
                return None
            node.success += 1
            node.tcp_failure = node.timeout_failure = 0
            count = node.success
        else:
            if not node.healthy:
                node.success = 0
                return None
            node.success = 0
            if outcome == TCP_FAILURE:
                node.tcp_failure += 1
                count = node.tcp_failure
            else:
                node.timeout_failure += 1
                count = node.timeout_failure
        if count < limit:
            return None
        node.healthy = outcome == SUCCESS
        (self.unhealthy.discard if node.healthy else self.unhealthy.add)(addr)
        return node.status

    def as_dict(self):
        """This checker as APISIX's ``GET /v1/healthcheck`` lists it."""
        return {"name": self.name, "type": self.checks.type,
                "nodes": [node.as_dict() for node in self.nodes.values()]}


def merge_reports(replies):
    """One ``/v1/healthcheck`` list from several processes' (``--workers``).

    Counters are summed; a node every process sees one way keeps that status,
    otherwise it is ``mostly_healthy`` or ``mostly_unhealthy`` by majority.
    """
    merged, order = {}, []
    for reply in replies:
        for checker in reply:
            entry = merged.get(checker["name"])
            if entry is None:
                entry = merged[checker["name"]] = {"name": checker["name"],
                                                   "type": checker["type"], "nodes": {}}
                order.append(checker["name"])
            for node in checker["nodes"]:
                key = (node["ip"], node["port"])
                seen = entry["nodes"].setdefault(key, dict(node, counter=dict.fromkeys(
                    node["counter"], 0), votes=[]))
                for name, value in node["counter"].items():
                    seen["counter"][name] += value
                seen["votes"].append(node["status"])
    out = []
    for name in order:
        entry = merged[name]
        nodes = []
        for node in entry["nodes"].values():
            votes = node.pop("votes")
            up = sum(status in ("healthy", "mostly_healthy") for status in votes)
            if len(set(votes)) == 1:
                node["status"] = votes[0]
            elif up == len(votes):
                node["status"] = "mostly_healthy"
            elif not up:
                node["status"] = "mostly_unhealthy"
            else:
                node["status"] = "mostly_healthy" if up * 2 >= len(votes) else "mostly_unhealthy"
            nodes.append(node)
        out.append({"name": name, "type": entry["type"], "nodes": nodes})
    return out
