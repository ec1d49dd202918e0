"""Two tenants on one port, chosen by the CONNECT (docs/routing.md): real mosquitto, paho.

One gproxy listens on a plain port and a TLS port; every route matches both.
Tenant A's route takes clients whose username is ``tenant-a`` (priority 10);
tenant B's takes client ids matching ``^b-[0-9]+$``.  Each has its own broker,
so where a client went is what that broker saw.  The same clients go over
raw TCP, TLS (certificates from the Admin API) and WebSocket (on both
ports), and a client neither route takes is refused after its CONNECT with
nothing reaching either broker.
"""

import pytest

from tests import needs, packets
from tests.integration.conftest import HOST, mqtt_route, node
from tests.integration.helpers import WAIT, Paho, dial, expect_closed, recv_exact
from tests.integration.test_tls import Pki, SniContext  # noqa: F401 (pki fixture below)

mqtt = needs.module("paho.mqtt.client", "bash scripts/venv.sh test")

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

SNI = "tenant-a.example"


def tenant(route_id, broker, rule, priority=None):
    route = mqtt_route([node(broker)], route_id=route_id, type_="roundrobin")
    conf = route["plugins"]["mqtt-proxy"]
    conf["vars"] = rule
    if priority is not None:
        conf["priority"] = priority
    return route


@pytest.fixture(scope="module")
def setup(module_mosquitto, module_gproxy, tmp_path_factory):
    a, b = module_mosquitto("tenant-a"), module_mosquitto("tenant-b")
    pki = Pki(str(tmp_path_factory.mktemp("pki")))
    routes = [tenant("a", a, [["mqtt_username", "==", "tenant-a"]], priority=10),
              tenant("b", b, [["mqtt_client_id", "~~", "^b-[0-9]+$"]])]

    def config(ports):
        return {"apisix": {"stream_proxy": {"tcp": [
            "%s:%d" % (HOST, ports[0]), {"addr": "%s:%d" % (HOST, ports[1]), "tls": True}]}}}

    gp = module_gproxy(routes, config=config, listeners=2)
    status, body = gp.admin("PUT", "/ssls/1", pki.ssl_object(1, [SNI]))
    assert status == 201, body
    return gp, a, b, pki


def clients(setup, transport):
    """Keyword arguments for Paho over ``transport``: tcp, tls, ws or wss."""
    gp, _, _, pki = setup
    kw = {"transport": "websockets" if transport in ("ws", "wss") else "tcp"}
    port = gp.ports[1] if transport in ("tls", "wss") else gp.ports[0]
    if transport in ("tls", "wss"):
        kw["tls_context"] = pki.client_context(SNI)
    return port, kw


@pytest.mark.parametrize("transport", ["tcp", "tls", "ws", "wss"])
def test_two_tenants_on_one_port_reach_their_own_brokers(setup, transport):
    gp, a, b, _ = setup
    port, kw = clients(setup, transport)
    mark_a, mark_b, mark = a.log.mark(), b.log.mark(), gp.mark()
    ida, idb = "dev-a-%s" % transport, "b-%d" % (len(transport) * 1000 + 7)
    with Paho(ida, port, username="tenant-a", **kw) as ca, \
            Paho(idb, port, **kw) as cb, \
            Paho("b-42-%s" % transport, port, username="tenant-a", **kw) as both:
        ca.subscribe("t/%s" % transport, qos=1)
        both.publish("t/%s" % transport, b"to tenant a", qos=1)  # priority 10: tenant A
        assert ca.expect_message().payload == b"to tenant a"
        cb.subscribe("t/%s" % transport, qos=1)
        cb.publish("t/%s" % transport, b"to tenant b", qos=1)
        assert cb.expect_message().payload == b"to tenant b"
        assert ca.messages.empty()  # another broker: tenant A never sees it
        gp.wait_for_session_line(ca.local_port if transport in ("tcp", "ws") else
                                 (HOST, ca.local_port), "route chosen by the connect: route=a",
                                 since=mark)
    a.wait_for_client(ida, since=mark_a)
    a.wait_for_client("b-42-%s" % transport, since=mark_a)
    b.wait_for_client(idb, since=mark_b)
    assert ida not in b.client_ids(mark_b) and idb not in a.client_ids(mark_a)


@pytest.mark.parametrize("transport", ["tcp", "tls"])
def test_a_client_no_route_takes_is_refused_after_its_connect(setup, transport):
    gp, a, b, pki = setup
    mark_a, mark_b, mark = a.log.mark(), b.log.mark(), gp.mark()
    if transport == "tls":
        sock = pki.client_context(SNI).wrap_socket(dial(gp.ports[1]), server_hostname=SNI)
    else:
        sock = dial(gp.ports[0])
    with sock:
        sock.sendall(packets.connect_v311("nobody", username="tenant-z"))
        expect_closed(sock)
        port = sock.getsockname()[1]
    gp.wait_for_session_line((HOST, port), "match(): not hit any route", since=mark)
    assert a.connections(mark_a) == [] and b.connections(mark_b) == []


def test_a_websocket_client_no_route_takes_hears_a_close_frame(setup):
    from tests.integration.wsclient import WsClient
    gp, a, b, _ = setup
    mark_a, mark_b = a.log.mark(), b.log.mark()
    ws = WsClient(gp.ports[0]).open()
    ws.send_mqtt(packets.connect_v311("nobody"))
    fin, opcode, payload = ws.frame()
    assert (opcode, int.from_bytes(payload[:2], "big")) == (0x8, 1008)
    ws.sock.close()
    assert a.connections(mark_a) == [] and b.connections(mark_b) == []


def test_raw_connect_bytes_arrive_unchanged_at_the_chosen_broker(setup):
    gp, a, _, _ = setup
    mark_a = a.log.mark()
    with dial(gp.ports[0]) as sock:
        sock.sendall(packets.connect_v311("raw-a", username="tenant-a"))
        assert recv_exact(sock, 4) == bytes.fromhex("20 02 00 00")
        sock.sendall(packets.disconnect())
    a.wait_for_client("raw-a", since=mark_a, timeout=WAIT)


# -- WebSocket options belong to the route the CONNECT chose --------------------------

@pytest.fixture
def ws_routes(mosquitto, gproxy):
    from tests.integration.wsclient import WsBridge
    plain, behind = mosquitto("plain"), mosquitto("behind-bridge")
    bridge = WsBridge(behind.port)
    strict = tenant("strict", plain, [["mqtt_username", "==", "strict"]])
    strict["plugins"]["mqtt-proxy"]["websocket"] = {"path": "/strict"}
    passing = mqtt_route([{"host": HOST, "port": bridge.port, "weight": 1}], route_id="pt",
                         type_="roundrobin")
    passing["plugins"]["mqtt-proxy"]["vars"] = [["mqtt_client_id", "~~", "^pt-"]]
    passing["plugins"]["mqtt-proxy"]["websocket"] = {"mode": "passthrough"}
    gp = gproxy([strict, passing])
    yield gp, plain, behind, bridge
    bridge.close()


def test_the_chosen_routes_path_applies_after_the_connect(ws_routes):
    from tests.integration.wsclient import WsClient
    gp, plain, _, _ = ws_routes
    mark, mark_plain = gp.mark(), plain.log.mark()
    with WsClient(gp.port, path="/elsewhere") as ws:
        ws.open()  # accepted: any candidate might take it
        ws.send_mqtt(packets.connect_v311("s-1", username="strict"))
        ws.expect_close(1008)
    gp.wait_for_session_line(ws.local_port, "websocket refused by the route: 404 Not Found: "
                             "path /elsewhere not served (expected /strict)", since=mark)
    assert plain.connections(mark_plain) == []
    with Paho("s-2", gp.port, transport="websockets", ws_path="/strict",
              username="strict") as ok:
        ok.subscribe("s/t", 1)
    plain.wait_for_client("s-2", since=mark_plain)


def test_passthrough_chosen_by_vars_replays_the_frames(ws_routes):
    gp, _, behind, bridge = ws_routes
    mark = gp.mark()
    with Paho("pt-sub", gp.port, transport="websockets") as sub, \
            Paho("pt-pub", gp.port, transport="websockets") as pub:
        sub.subscribe("pt/t", 1)
        pub.publish("pt/t", b"through the bridge", 1)
        assert sub.expect_message().payload == b"through the bridge"
        gp.wait_for_session_line(sub.local_port, "route chosen by the connect: route=pt",
                                 since=mark)
    assert len(bridge.requests) == 2  # the broker's WebSocket listener got both upgrades
    behind.wait_for_client("pt-sub")
