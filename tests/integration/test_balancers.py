"""least_conn and ewma with a real gproxy, real mosquitto brokers and long-lived sessions.

least_conn (APISIX's apisix/balancer/least_conn.lua) must spread sessions that
stay open evenly over the brokers, and send new ones to a broker that was
restarted (and so lost its sessions) until it has caught up; roundrobin would
keep handing it only its turn.  The counts are read from the brokers' own
logs (who accepted which client id), not from gproxy.
"""

import pytest

from tests import packets
from tests.integration.conftest import mqtt_route, node, wait_until
from tests.integration.helpers import CONNACK_OK, dial, recv_exact

pytestmark = pytest.mark.integration


class Clients:
    """Raw MQTT 3.1.1 sessions held open through gproxy (a CONNECT, its CONNACK)."""

    def __init__(self, port):
        self.port = port
        self.socks = {}

    def open(self, client_id):
        sock = dial(self.port)
        sock.sendall(packets.connect_v311(client_id))
        packets.assert_packet(recv_exact(sock, 4), CONNACK_OK, "CONNACK for %s" % client_id)
        self.socks[client_id] = sock

    def close(self):
        for sock in self.socks.values():
            sock.close()


@pytest.fixture
def clients():
    made = []

    def make(port):
        made.append(Clients(port))
        return made[-1]
    yield make
    for c in made:
        c.close()


def where(brokers, ids, since):
    """``{broker name: count}`` of ``ids`` each broker saw connect since the marks."""
    seen = {b.name: set(b.client_ids(since[b.name])) & set(ids) for b in brokers}
    return {name: len(found) for name, found in seen.items()}


def live(gp):
    return gp.admin("GET", "/gproxy/stats")[1]["per_node"]


def test_least_conn_spreads_long_sessions_and_refills_a_restarted_broker(
        gproxy, mosquitto, clients):
    brokers = [mosquitto("b%d" % i) for i in range(3)]
    gp = gproxy([mqtt_route([node(b) for b in brokers], type_="least_conn")])
    marks = {b.name: 0 for b in brokers}
    held = clients(gp.port)
    first = ["even-%d" % i for i in range(30)]
    for cid in first:
        held.open(cid)
    assert where(brokers, first, marks) == {"b0": 10, "b1": 10, "b2": 10}

    # b1 restarts: its 10 sessions end, and their clients come back meanwhile
    lost = [cid for cid in first if cid in brokers[1].client_ids()]
    brokers[1].stop()
    for cid in lost:  # each client sees its broker go, and closes, as MQTT clients do
        sock = held.socks.pop(cid)
        assert sock.recv(16) == b""
        sock.close()
    assert wait_until(lambda: brokers[1].addr not in live(gp), 5), live(gp)
    marks = {b.name: b.log.mark() for b in brokers}
    for cid in lost:
        held.open(cid + "-again")
    assert where(brokers, [c + "-again" for c in lost], marks) == {"b0": 5, "b1": 0, "b2": 5}
    brokers[1].start()

    # the restarted broker takes every new session until it has caught up (15 each)
    marks = {b.name: b.log.mark() for b in brokers}
    refill = ["refill-%d" % i for i in range(15)]
    for cid in refill:
        held.open(cid)
    assert where(brokers, refill, marks) == {"b0": 0, "b1": 15, "b2": 0}
    assert sorted(live(gp).values()) == [15, 15, 15]
    then = ["then-%d" % i for i in range(6)]
    marks = {b.name: b.log.mark() for b in brokers}
    for cid in then:
        held.open(cid)
    assert where(brokers, then, marks) == {"b0": 2, "b1": 2, "b2": 2}


def test_ewma_and_a_type_apisix_does_not_know(gproxy, mosquitto, clients):
    brokers = [mosquitto("e%d" % i) for i in range(2)]
    nodes = [node(b) for b in brokers]
    gp = gproxy(lambda ports: [
        mqtt_route(nodes, type_="ewma", server_port=ports[0]),
        mqtt_route(nodes, route_id=2, type_="random", server_port=ports[1])], listeners=2)
    held = clients(gp.port)
    ids = ["ewma-%d" % i for i in range(8)]
    for cid in ids:
        held.open(cid)
    assert sum(where(brokers, ids, {"e0": 0, "e1": 0}).values()) == 8
    mark = gp.mark()
    sock = dial(gp.ports[1])
    sock.sendall(packets.connect_v311("nobody"))
    assert sock.recv(16) == b""
    sock.close()
    gp.wait_for_log("failed to pick server: invalid balancer type: random", since=mark)
