"""The stream access log of a real gproxy, parsed line by line.

One gproxy, three listeners: plain TCP (MQTT and MQTT over WebSocket), TLS,
and one whose route carries ip-restriction (and does not match every
client).  Sessions that relay, and sessions refused the ways nginx logs
them (403 ip-restriction, 502 no route, 503 mqtt-proxy's exit), each leave
exactly one line; the JSON format is parsed with ``json.loads``, the default
(APISIX's) format with a regular expression.  SIGUSR1 reopens the file after
logrotate's rename.
"""

import json
import os
import re
import signal
import socket

import pytest

from tests import packets
from tests.integration.conftest import HOST, mqtt_route, node, wait_until
from tests.integration.helpers import CONNACK_OK, Paho, recv_exact
from tests.integration.test_tls import Pki, SniContext  # noqa: F401 (the pki fixture's class)

pytestmark = pytest.mark.integration

JSON_FORMAT = ('{"remote_addr":"$remote_addr","remote_port":"$remote_port",'
               '"server_port":"$server_port","protocol":"$protocol","status":"$status",'
               '"bytes_sent":$bytes_sent,"bytes_received":$bytes_received,'
               '"session_time":$session_time,"upstream_addr":"$upstream_addr",'
               '"client_id":"$mqtt_client_id","username":"$mqtt_username",'
               '"route_id":"$route_id","sni":"$ssl_server_name","time_local":"$time_local"}')
DEFAULT_LINE = re.compile(r"^(\S+) \[(\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4})\] TCP (\d{3}) "
                          r"(\d+) (\d+) (\d+\.\d{3})$")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return Pki(str(tmp_path_factory.mktemp("pki")))


def lines(path, count, timeout=5.0):
    def read():
        try:
            with open(path, encoding="utf-8") as fh:
                got = fh.read().splitlines()
        except FileNotFoundError:
            return None
        return got if len(got) >= count else None
    found = wait_until(read, timeout)
    assert found, "fewer than %d lines in %s: %r" % (count, path, read.__name__)
    return found


def mqtt_session(sock, client_id, username=None):
    sock.sendall(packets.connect_v311(client_id, username=username))
    packets.assert_packet(recv_exact(sock, 4), CONNACK_OK, "CONNACK")
    sock.sendall(packets.disconnect())
    return sock.getsockname()[1]


def refused(port, data, source=HOST):
    sock = socket.create_connection((HOST, port), timeout=5, source_address=(source, 0))
    try:
        sock.sendall(data)
        assert sock.recv(16) == b""
    except ConnectionResetError:
        pass
    finally:
        local = sock.getsockname()[1]
        sock.close()
    return local


def test_json_access_log_of_tcp_tls_websocket_and_refusals(gproxy, mosquitto, pki):
    broker = mosquitto()
    config = lambda ports: {  # noqa: E731
        "apisix": {"stream_proxy": {"tcp": [
            "%s:%d" % (HOST, ports[0]), {"addr": "%s:%d" % (HOST, ports[1]), "tls": True},
            "%s:%d" % (HOST, ports[2])]}},
        "nginx_config": {"stream": {"enable_access_log": True, "access_log": "logs/stream.log",
                                    "access_log_format": JSON_FORMAT,
                                    "access_log_format_escape": "json"}}}
    routes = lambda ports: [  # noqa: E731
        mqtt_route([node(broker)], route_id=1, type_="roundrobin", server_port=ports[0]),
        mqtt_route([node(broker)], route_id=2, type_="roundrobin", server_port=ports[1]),
        dict(mqtt_route([node(broker)], route_id=3, type_="roundrobin", server_port=ports[2],
                        remote_addr="127.0.0.0/30"),
             plugins={"ip-restriction": {"blacklist": ["127.0.0.2"]},
                      "mqtt-proxy": {"protocol_level": 4}})]
    gp = gproxy(routes, config=config, listeners=3)
    assert gp.admin("PUT", "/ssls/1", pki.ssl_object(1, ["tenant-a.example"]))[0] == 201
    path = os.path.join(gp.dir, "logs", "stream.log")
    tcp, tls_port, guarded = gp.ports

    with socket.create_connection((HOST, tcp), timeout=5) as sock:
        tcp_local = mqtt_session(sock, 'quote"d-\u00e9', username="tenant-a")
        assert sock.recv(1) == b""
    with Paho("ws-1", tcp, transport="websockets") as ws:
        ws_local = ws.local_port
    ctx = pki.client_context("tenant-a.example")
    with socket.create_connection((HOST, tls_port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="tenant-a.example") as sock:
            tls_local = mqtt_session(sock, "tls-1")
    blocked = refused(guarded, packets.connect_v311("blocked"), source="127.0.0.2")
    unrouted = refused(guarded, packets.connect_v311("nowhere"), source="127.0.0.9")
    wrong_level = refused(tcp, packets.connect_v5("five"))

    by_port = {int(e["remote_port"]): e for e in map(json.loads, lines(path, 6))}
    assert len(by_port) == 6  # one line per session, each parsed whole
    assert {p: by_port[p]["status"] for p in by_port} == {
        tcp_local: "200", ws_local: "200", tls_local: "200",
        blocked: "403", unrouted: "502", wrong_level: "503"}
    first = by_port[tcp_local]
    assert (first["client_id"], first["username"], first["route_id"]) == (
        'quote"d-\u00e9', "tenant-a", "1")
    assert first["upstream_addr"] == broker.addr and first["protocol"] == "TCP"
    assert first["bytes_sent"] == 4  # the CONNACK
    assert first["bytes_received"] == len(packets.connect_v311(
        'quote"d-\u00e9', username="tenant-a")) + len(packets.disconnect())
    assert by_port[tls_local]["sni"] == "tenant-a.example"
    assert by_port[ws_local]["client_id"] == "ws-1"
    assert by_port[ws_local]["bytes_received"] > 0
    assert by_port[blocked]["route_id"] == "3" and by_port[blocked]["bytes_received"] == 0
    assert by_port[blocked]["upstream_addr"] == "" and by_port[unrouted]["route_id"] == ""
    assert by_port[wrong_level]["bytes_received"] == len(packets.connect_v5("five"))
    assert all(0 <= e["session_time"] < 5 for e in by_port.values())


def test_default_format_and_reopen_on_sigusr1(gproxy, mosquitto):
    broker = mosquitto()
    gp = gproxy([mqtt_route([node(broker)], type_="roundrobin")], config={
        "nginx_config": {"stream": {"enable_access_log": True}}})
    path = os.path.join(gp.dir, "logs", "access_stream.log")  # APISIX's default path
    with socket.create_connection((HOST, gp.port), timeout=5) as sock:
        mqtt_session(sock, "before")
    (line,) = lines(path, 1)
    found = DEFAULT_LINE.match(line)
    assert found, line
    assert found.group(1, 3, 4) == ("127.0.0.1", "200", "4")

    os.rename(path, path + ".1")  # logrotate, then its postrotate: kill -USR1
    gp.proc.send_signal(signal.SIGUSR1)
    assert wait_until(lambda: os.path.exists(path), 5), "not reopened after SIGUSR1"
    with socket.create_connection((HOST, gp.port), timeout=5) as sock:
        mqtt_session(sock, "after")
    assert len(lines(path, 1)) == 1
    with open(path + ".1") as fh:
        assert len(fh.read().splitlines()) == 1
