"""Limits and overload with real processes: limit-conn, gproxy-limit-rate, clients
waiting in the backlog beyond max_connections, running out of file
descriptors (a child gproxy with a low RLIMIT_NOFILE).  The HTTP listeners'
own cap and timeouts are in test_http_floods.py."""

import os
import resource
import socket
import time

import pytest

from tests import packets
from tests.integration.conftest import accept_queue, mqtt_route, node, wait_until
from tests.integration.helpers import CONNACK_OK, dial, expect_closed, raw_session, recv_exact

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def open_session(port, client_id, timeout=5.0):
    """A raw MQTT 3.1.1 session left open after its CONNACK; returns the socket."""
    sock = dial(port, timeout=timeout)
    sock.sendall(packets.connect_v311(client_id))
    assert recv_exact(sock, 4) == CONNACK_OK
    return sock


def rejected(gp):
    code, body = gp.admin("GET", "/gproxy/stats")
    assert code == 200
    return body["rejected"]


def test_limit_conn_delays_the_burst_and_refuses_beyond_it(mosquitto, gproxy):
    broker = mosquitto()
    route = mqtt_route([node(broker)], level=4)
    route["plugins"]["limit-conn"] = {"conn": 1, "burst": 1, "default_conn_delay": 1,
                                      "key": "remote_addr"}
    gp = gproxy([route])
    first = open_session(gp.port, "lc-1")
    started = time.monotonic()
    second = dial(gp.port)
    second.sendall(packets.connect_v311("lc-2"))
    third = dial(gp.port)
    third.sendall(packets.connect_v311("lc-3"))
    assert expect_closed(third) in ("eof", "reset")
    assert recv_exact(second, 4) == CONNACK_OK
    assert time.monotonic() - started >= 0.9  # the burst waits default_conn_delay
    gp.wait_for_log("limit-conn exits with status code 503")
    assert rejected(gp) == {"limit_conn": 1}
    for s in (first, second, third):
        s.close()
    wait_until(lambda: not gp.admin("GET", "/gproxy/sessions")[1]["total"], 5)
    started = time.monotonic()
    open_session(gp.port, "lc-4").close()  # slots given back: no wait
    assert time.monotonic() - started < 0.9


def test_limit_rate_turns_a_reconnect_storm_away(mosquitto, gproxy):
    broker = mosquitto()
    route = mqtt_route([node(broker)], level=4)
    route["plugins"]["gproxy-limit-rate"] = {"rate": 1, "burst": 2}
    gp = gproxy([route])
    served = 0
    started = time.monotonic()
    for i in range(10):
        sock = dial(gp.port)
        sock.sendall(packets.connect_v311("storm-%d" % i))
        try:
            if sock.recv(4) == CONNACK_OK:
                served += 1
        except ConnectionResetError:
            pass
        sock.close()
    took = time.monotonic() - started
    assert 3 <= served <= 3 + int(took) + 1, (served, took)  # burst 2 + 1, plus 1 a second
    assert rejected(gp) == {"limit_rate": 10 - served}
    gp.wait_for_log("gproxy-limit-rate exits with status code 503")
    time.sleep(1.1)
    raw_session(gp.port, "after-the-storm")


def test_beyond_max_connections_clients_wait_in_the_backlog(sink, gproxy):
    gp = gproxy([mqtt_route([node(sink)], level=4)], config={"gproxy": {"max_connections": 2}})
    held = []
    for i in range(2):
        s = dial(gp.port)
        s.sendall(packets.connect_v311("held-%d" % i))
        held.append(s)
    sink.wait_for_connection(1)
    waiting = dial(gp.port)  # the kernel completes the handshake: it waits in the backlog
    waiting.sendall(packets.connect_v311("waiting"))
    assert wait_until(lambda: accept_queue(gp.port) == 1, 5), "gproxy accepted a third client"
    assert sink.settle() == 2
    held[0].close()
    third = sink.wait_for_connection(2)
    assert third.wait_for_bytes(5)
    assert rejected(gp) == {}  # waited, never refused
    for s in held[1:] + [waiting]:
        s.close()


def _fd_count(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def _cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_running_out_of_fds_is_logged_counted_and_recovers(mosquitto, gproxy):
    broker = mosquitto()
    limit = 64

    def low_fd_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    gp = gproxy([mqtt_route([node(broker)], level=4)], preexec_fn=low_fd_limit)
    free = limit - _fd_count(gp.proc.pid)
    assert free > 10, "gproxy already uses %d of %d fds" % (limit - free, limit)
    clients, closed = [], 0
    for i in range(free // 2 + 8):  # two fds a session: more than fit
        sock = dial(gp.port, timeout=2)
        sock.sendall(packets.connect_v311("fd-%d" % i))
        clients.append(sock)
    for sock in clients:
        try:
            if sock.recv(4) != CONNACK_OK:
                closed += 1
        except (socket.timeout, ConnectionResetError):
            closed += 1  # refused, or still waiting in the backlog
    assert closed, "every client got a session: the limit was not reached"
    cpu = _cpu_seconds(gp.proc.pid)
    time.sleep(2.0)
    assert _cpu_seconds(gp.proc.pid) - cpu < 0.5, "gproxy spins while out of fds"
    lines = gp.find("Too many open files")
    assert lines, gp.log()[-3000:]
    assert all("[crit]" in ln and ("accept4() failed" in ln or "socket() failed" in ln)
               for ln in lines), lines
    stamps = [ln[:19] for ln in lines]
    assert len(stamps) == len(set(stamps)), "more than one line a second:\n" + "\n".join(lines)
    for sock in clients:
        sock.close()
    # it recovers by itself: new sessions are served, the refusals were counted
    ok = wait_until(lambda: _try_session(gp.port), 10, 0.2)
    assert ok, gp.log()[-3000:]
    assert rejected(gp).get("fd_limit", 0) >= 1
    assert "Traceback" not in gp.log()


def _try_session(port):
    try:
        raw_session(port, "after-fds")
        return True
    except (AssertionError, OSError):
        return False
