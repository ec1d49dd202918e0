"""Choose a node and connect to it: hash key, DNS, balancer order, retries.

APISIX's balancer phase for stream routes (docs/apisix-behaviour.md §5.2-5.4):
domain nodes are resolved per connection (failures dropped), one node skips
the balancer, chash hashes the variable named by ``key`` and falls back to
the client address when it is unset, and a failed connect moves on to the
next candidate within ``retries`` and ``retry_timeout``.  Nodes the health
checker marks unhealthy are skipped (all are tried when none is healthy), and
every dial's outcome is reported to it (passive checks) and to the registry
(connect failures per node, dial latency).  A dial that fails because this
process is out of descriptors is not the node's fault: the client is refused
at once (``fd_limit``) and accepting pauses.  A least_conn upstream counts
the session on a node from the moment it is picked (a failed dial gives it
back before the next pick) until the session ends; an ewma upstream learns
each successful dial's connect time.
"""

import logging
import socket
import time

from gproxy.errors import NoUpstream, Reject
from gproxy.model.balancer import TYPES as BALANCER_TYPES
from gproxy.model.health import SUCCESS, TCP_FAILURE, TIMEOUT
from gproxy.model.routes import DEFAULT_CONNECT_TIMEOUT
from gproxy.proxy import netio
from gproxy.proxy.accept import tls
from gproxy.proxy.accept.overload import out_of_fds
from gproxy.proxy.health import passive


def session_vars(s):
    """nginx-style variables a chash ``key`` may name (plus what phases set)."""
    info = s.info
    found = {"remote_addr": info.client_addr, "remote_port": str(info.client_port),
             "server_addr": info.server_addr, "server_port": str(info.server_port)}
    found.update(s.vars)
    return found


def hash_key(s, upstream):
    """The chash key as bytes, or None for other balancers.

    Computed even for a one-node upstream, which skips the balancer (and so
    the key and its log line, as APISIX does): the session record keeps it so
    that rebalancing can ask the ring where the client belongs once nodes are
    added.
    """
    if upstream.type != "chash":
        return None
    value = None
    if upstream.hash_on == "vars":  # a variable a phase set (the client id...): no table
        value = s.vars.get(upstream.key)
    if value is None or value == "":
        value = upstream.hash_value(session_vars(s))
    if value is None:
        if len(upstream.nodes) > 1:
            s.log(logging.WARNING, "chash_key fetch is nil, use default chash_key "
                  "remote_addr: %s", s.info.client_addr)
        value = s.info.client_addr
    return value if isinstance(value, bytes) else value.encode()


def resolve(s, upstream, timeout):
    """Domain nodes as IP nodes (None when every node is an IP already), the
    lookups bounded by ``timeout`` (a name not resolved by then is dropped)."""
    if not upstream.needs_dns:
        return None
    nodes = netio.resolve_nodes(upstream.nodes, lambda node, exc: s.log(
        logging.ERROR, "failed to parse domain: %s, error: %s", node.host, exc), timeout)
    if not nodes:
        raise NoUpstream("failed to set upstream: no valid upstream node")
    return nodes


def dial(s):
    """Connect to the first candidate that answers; sets ``s.upstream_sock``."""
    upstream = s.upstream
    if not upstream.nodes:  # a discovered service with no answer, or none at all
        raise NoUpstream(upstream.no_nodes())
    key = s.info.hash_key = hash_key(s, upstream)
    timeout = (upstream.connect_timeout or s.settings.connect_timeout
               or DEFAULT_CONNECT_TIMEOUT)
    deadline = time.monotonic() + upstream.retry_timeout if upstream.retry_timeout else None
    # the names get one connect timeout, and no more than the retries' deadline
    balancer = upstream.balancer(resolve(s, upstream, min(timeout, upstream.retry_timeout
                                                          or timeout)))
    if upstream.type not in BALANCER_TYPES and len(balancer.nodes) > 1:
        raise NoUpstream("failed to pick server: invalid balancer type: %s" % upstream.type)
    s.set_state("connecting")
    tried = s.tried
    health = upstream.health
    unhealthy = health.unhealthy if health is not None else ()
    tries = upstream.tries(len(balancer.nodes))
    for node in balancer.candidates(key, tries, unhealthy):
        if deadline and tried and time.monotonic() > deadline:
            break
        tried.append(node.addr)
        release = balancer.acquire(node)  # least_conn: counted from the pick on
        try:
            conn = _attempt(s, upstream, balancer, node, timeout, health)
        finally:
            if release is not None and s.upstream_sock is None:
                release()  # this dial failed (or raised): the next pick must not see it
        if conn is None:
            continue
        if release is not None:
            s.cleanup.append(release)
        return
    if not tried:
        raise NoUpstream("failed to pick server: no node available")
    raise NoUpstream("all upstream servers tried: %s" % ", ".join(tried))


def _attempt(s, upstream, balancer, node, timeout, health):
    """Dial ``node``; on success set ``s.upstream_sock`` and return it, else None."""
    s.peer = node.addr
    s.log(logging.INFO, "proxy request to %s", node.addr)
    started = time.monotonic()
    conn = netio.connect(node.dial_host, node.port, timeout)
    if (s.preamble or upstream.scheme == "tls") and not isinstance(conn, OSError):
        conn = _prepare(s, upstream, node, conn, timeout)
    if isinstance(conn, tls.UpstreamTlsError):
        return None  # logged by the TLS handshake
    if isinstance(conn, OSError):
        _failed(s, node, conn, health)
        return None
    elapsed = time.monotonic() - started
    s.registry.dialled(node.addr, elapsed)
    balancer.observe(node, elapsed)
    if health is not None:
        passive(health, node.addr, SUCCESS)
    s.upstream_sock = conn
    s.registry.set_node(s.info, node.addr)
    return conn


def _failed(s, node, exc, health):
    if out_of_fds(exc):  # our own limit: say so once a second, refuse, pause accepting
        s.listener.gate.out_of_fds(exc, "socket()", count=False)  # the Reject counts it
        raise Reject("fd_limit", logging.DEBUG, "socket() failed (%d: %s)",
                     exc.errno, exc.strerror)
    s.log(logging.ERROR, "connect() failed (%s)", _errtext(exc))
    timed_out = isinstance(exc, socket.timeout)
    s.registry.connect_failed(node.addr, "timeout" if timed_out else "error")
    if health is not None:
        passive(health, node.addr, TIMEOUT if timed_out else TCP_FAILURE)


def _prepare(s, upstream, node, conn, timeout):
    """A fresh connection's first bytes: the PROXY header, then TLS (nginx's order)."""
    try:
        if s.preamble:
            netio.sendall(conn, s.preamble, timeout)
        if upstream.scheme == "tls":
            conn = netio.adopt_weak(conn)
            conn = tls.connect(s, upstream, node, conn, timeout)
    except OSError as exc:
        conn.close()
        return exc
    return conn


def _errtext(exc):
    if isinstance(exc, socket.timeout):
        return "110: Connection timed out"
    return "%s: %s" % (exc.errno, exc.strerror) if exc.errno else str(exc)
