"""Health checking I/O: one active checker per checked upstream, and passive reports.

``HealthCheckers.sync(table)`` follows the route table: an upstream with
``checks`` and more than one node (APISIX checks no single-node upstream)
gets a ``Checker``, a greenlet that probes each node every
``healthy.interval`` (or ``unhealthy.interval`` while it is down) with a TCP
connect, or with an MQTT CONNECT/CONNACK/DISCONNECT for ``type: mqtt``.  A
table swap keeps the checker, and so the health, of every upstream whose
``checks`` did not change; its nodes follow the new node list.  The state
itself (counters, thresholds, what balancers skip) is
``gproxy.model.health``; ``passive()`` is how a session's dial reports.
Probes never count as sessions and never log a CONNECT's credentials.
"""

import logging
import socket
import time

import gevent
from gevent.pool import Pool

from gproxy.errors import MalformedPacket
from gproxy.model.health import SUCCESS, TCP_FAILURE, TIMEOUT, Checks, HealthState
from gproxy.protocols import mqttstream
from gproxy.proxy import netio
from gproxy.proxy.accept.overload import out_of_fds

log = logging.getLogger("gproxy.health")


def _changed(state, addr, status, outcome, how):
    node = state.nodes[addr]
    level = logging.WARNING if status == "unhealthy" else logging.INFO
    log.log(level, "healthcheck: %s node %s is %s (success=%d tcp_failure=%d "
            "timeout_failure=%d, %s)", state.name, addr, status, node.success,
            node.tcp_failure, node.timeout_failure, how)


def passive(state, addr, outcome):
    """A real session's dial to ``addr`` ended with ``outcome``."""
    status = state.report(addr, outcome, passive=True)
    if status is not None:
        _changed(state, addr, status, outcome, "passive")


def probe_tcp(host, port, timeout):
    conn = netio.connect(host, port, timeout)
    if isinstance(conn, OSError):
        return conn
    conn.close()
    return SUCCESS


def probe_mqtt(host, port, timeout, conf):
    """CONNECT, wait for CONNACK, DISCONNECT: a broker may take TCP and refuse clients."""
    deadline = time.monotonic() + timeout
    conn = netio.connect(host, port, timeout)
    if isinstance(conn, OSError):
        return conn
    level = conf["protocol_level"]
    try:
        netio.sendall(conn, mqttstream.connect(conf["client_id"], level, 0,
                                               conf.get("username"), conf.get("password")),
                      max(deadline - time.monotonic(), 0.001))
        buf = b""
        code = None
        while code is None:
            chunk = netio.recv(conn, 64, deadline)
            if not chunk:
                return TCP_FAILURE
            buf += chunk
            code = mqttstream.connack_code(buf)
        if code != 0:
            return TCP_FAILURE
        netio.sendall(conn, mqttstream.disconnect(level), 1.0)
        return SUCCESS
    except socket.timeout as exc:
        return exc
    except (OSError, MalformedPacket):
        return TCP_FAILURE
    finally:
        conn.close()


def _outcome(result):
    if isinstance(result, socket.timeout):
        return TIMEOUT
    if isinstance(result, OSError):
        return None if out_of_fds(result) else TCP_FAILURE  # our fds, not the node's fault
    return result


#: Probes of one upstream in flight at most, whatever ``active.concurrency`` asks
#: (APISIX's schema bounds it not at all; gevent's pool takes a C int).
MAX_CONCURRENCY = 1024


def probes_at_once(active):
    return min(max(int(active.get("concurrency") or 1), 1), MAX_CONCURRENCY)


#: The longest a checker sleeps: nodes added by a route edit (``follow``) get
#: their first probe within this, whatever the others' intervals.
LOOK_EVERY = 1.0


def next_round_in(dues, now):
    """Seconds until the next probe round, given each node's next probe time.

    A node already due means a round now; one probed no more (``inf``) never
    counts.  (Sleeping until the next due time *in the future* skipped the
    nodes that came due while the round ran: with one node down at
    ``unhealthy.interval`` 3600, a node that went down later was not probed
    for an hour.)
    """
    finite = [due - now for due in dues if due != float("inf")]
    return min(max(min(finite), 0.0), LOOK_EVERY) if finite else LOOK_EVERY


class Checker:
    """Active probing of one upstream's nodes, on a greenlet of its own."""

    def __init__(self, upstream):
        self.checks = Checks(upstream.checks)
        self.state = HealthState(upstream.name, self.checks,
                                 [] if upstream.needs_dns else upstream.nodes)
        self.upstream = upstream
        self.due = {}  # addr -> monotonic time of its next probe
        self.greenlet = None

    def start(self):
        if self.checks.active is not None:
            self.greenlet = gevent.spawn(self._run)

    def stop(self):
        if self.greenlet is not None:
            self.greenlet.kill(block=False)
            self.greenlet = None

    def follow(self, upstream):
        """The table changed but these checks did not: probe the new node list."""
        self.upstream = upstream
        if not upstream.needs_dns:
            self.state.set_nodes(upstream.nodes)

    def _nodes(self):
        up = self.upstream
        if not up.needs_dns:
            return up.nodes
        nodes = netio.resolve_nodes(up.nodes, timeout=self.checks.active.get("timeout") or 1)
        self.state.set_nodes(nodes)
        return nodes

    def _run(self):
        active = self.checks.active
        pool = Pool(probes_at_once(active))
        while True:
            now = time.monotonic()
            nodes = self._nodes()
            due = [n for n in nodes if self.due.get(n.addr, 0) <= now]
            for node in due:
                pool.spawn(self._probe, node)
            pool.join()
            self._sleep(nodes)

    def _sleep(self, nodes):
        gevent.sleep(next_round_in([self.due.get(n.addr, 0) for n in nodes], time.monotonic()))

    def _probe(self, node):
        active = self.checks.active
        port = int(active.get("port") or node.port)  # a JSON 80.0 passes "integer"
        timeout = active.get("timeout") or 1
        host = node.dial_host
        try:
            if self.checks.probe == "mqtt":
                result = probe_mqtt(host, port, timeout, self.checks.mqtt)
            else:
                result = probe_tcp(host, port, timeout)
        except Exception:  # a probe must never kill its checker
            log.exception("healthcheck: probe of %s failed", node.addr)
            result = TCP_FAILURE
        outcome = _outcome(result)
        addr = node.addr
        if outcome is not None:
            status = self.state.report(addr, outcome)
            if status is not None:
                _changed(self.state, addr, status, outcome, "active %s probe" % self.checks.probe)
        interval = self.checks.interval(self.state.is_healthy(addr))
        # interval 0: no more probes in this status (passive reports may still change it)
        self.due[addr] = time.monotonic() + interval if interval else float("inf")


class HealthCheckers:
    """Every checker of one process, kept in step with the route table."""

    def __init__(self):
        self.checkers = {}  # upstream name -> Checker
        self.running = False  # probing starts with start(): not in a --workers parent

    def start(self):
        self.running = True
        for checker in self.checkers.values():
            if checker.greenlet is None:
                checker.start()

    def sync(self, table, names=None):
        """Attach health to ``table``'s checked upstreams (before it goes live).

        ``names``: the only upstreams that may have changed (a table update);
        None looks at every one (the first table).
        """
        if names is None:
            wanted = table.checked_upstreams()
            names = set(self.checkers) | set(wanted)
        else:
            wanted = {}
            for name in names:
                up = table.upstream_named(name)
                if up is not None and up.checks and len(up.nodes) > 1:
                    wanted[name] = up
        for name in names:
            self._follow(name, wanted.get(name))

    def _follow(self, name, up):
        checker = self.checkers.get(name)
        if checker is not None and (up is None or up.checks != checker.checks.conf):
            checker.stop()
            del self.checkers[name]
            checker = None
        if up is None:
            return
        if checker is None:
            checker = self.checkers[name] = Checker(up)
            if self.running:
                checker.start()
        else:
            checker.follow(up)
        up.health = checker.state

    def report(self):
        """Every checker as APISIX's ``GET /v1/healthcheck`` lists them."""
        return [checker.state.as_dict() for checker in self.checkers.values()]

    def stop(self):
        self.running = False
        for checker in self.checkers.values():
            checker.stop()
