"""APISIX's stream ip-restriction with a real gproxy on IPv4 and IPv6 loopback.

gproxy listens on 127.0.0.1 and [::1]; one route (to a real mosquitto)
carries the plugin.  A refused client is closed before gproxy reads a byte
(the broker never sees a connection), logged with APISIX's exit line and
counted under ``ip_restriction`` in the stats and the metrics; a client the
lists let through gets its CONNACK from the broker.  The lists change
through the Admin API while gproxy runs.
"""

import socket

import pytest

from tests import packets
from tests.integration.conftest import mqtt_route, node
from tests.integration.helpers import CONNACK_OK, recv_exact

pytestmark = pytest.mark.integration


def session(host, port, client_id):
    """``"ok"`` if the broker answered the CONNECT through gproxy, ``"refused"`` if
    gproxy closed the connection without a byte."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(5)
    try:
        sock.connect((host, port))
        try:
            sock.sendall(packets.connect_v311(client_id))
            first = sock.recv(4)
        except (ConnectionResetError, BrokenPipeError):
            return "refused"
        if first == b"":
            return "refused"
        packets.assert_packet(first + recv_exact(sock, 4 - len(first)), CONNACK_OK, "CONNACK")
        sock.sendall(packets.disconnect())
        return "ok"
    finally:
        sock.close()


def with_plugin(broker, conf):
    route = mqtt_route([node(broker)], type_="roundrobin")
    route["plugins"]["ip-restriction"] = conf
    return route


def test_ip_restriction_over_ipv4_and_ipv6_loopback(gproxy, mosquitto):
    broker = mosquitto()
    gp = gproxy([with_plugin(broker, {"blacklist": ["::1"]})], listeners=2,
                config=lambda ports: {"apisix": {"stream_proxy": {"tcp": [
                    "127.0.0.1:%d" % ports[0], "[::1]:%d" % ports[1]]}}})
    v4, v6 = ("127.0.0.1", gp.ports[0]), ("::1", gp.ports[1])
    mark = gp.mark()
    assert session(*v4, "v4-a") == "ok"
    broker_mark = broker.log.mark()
    assert session(*v6, "v6-a") == "refused"
    line = gp.wait_for_log("ip-restriction exits with status code 403", since=mark)
    assert "client: ::1, server: [::1]:%d" % gp.ports[1] in line
    assert "v6-a" not in broker.log.text(broker_mark)
    assert broker.connections(broker_mark) == []  # refused before anything went upstream

    # the other way round, from the Admin API: only IPv6 loopback, 404
    route = with_plugin(broker, {"whitelist": ["::1/128"], "response_code": 404})
    assert gp.admin("PUT", "/stream_routes/1", route)[0] == 200
    assert session(*v6, "v6-b") == "ok"
    assert session(*v4, "v4-b") == "refused"
    gp.wait_for_log("ip-restriction exits with status code 404", since=mark)

    # CIDRs: 127.0.0.0/30 lets 127.0.0.2 on and keeps 127.0.0.5 out
    route = with_plugin(broker, {"whitelist": ["127.0.0.0/30", "::1"]})
    assert gp.admin("PUT", "/stream_routes/1", route)[0] == 200
    assert session(*v4, "v4-c") == "ok"
    assert sourced("127.0.0.2", gp.ports[0], "v4-d") == "ok"
    assert sourced("127.0.0.5", gp.ports[0], "v4-e") == "refused"

    stats = gp.admin("GET", "/gproxy/stats")[1]
    assert stats["rejected"] == {"ip_restriction": 3}
    metrics = gp.metrics()
    assert metrics[("gproxy_rejected_total", frozenset({("reason", "ip_restriction")}))] == 3


def sourced(source, port, client_id):
    sock = socket.create_connection(("127.0.0.1", port), timeout=5,
                                    source_address=(source, 0))
    try:
        sock.sendall(packets.connect_v311(client_id))
        first = sock.recv(4)
    except ConnectionResetError:
        return "refused"
    finally:
        sock.close()
    return "ok" if first == CONNACK_OK else "refused"
