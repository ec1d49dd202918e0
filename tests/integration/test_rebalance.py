"""--workers rebalancing: when one worker holds far more live sessions than the
others, the parent moves some of them, live, to the least busy one.

Clients are raw MQTT 3.1.1 sockets through gproxy --workers 2 to mosquitto; the
sessions API tells which worker each lives on (its id starts with the worker's
pid).  Closing every client of one worker leaves the other with all of them; the
next round must move half the gap, and every moved session must go on working
(PINGREQ answered, no close), and an eviction must still find a moved session.
"""

import time

import pytest

from tests import packets
from tests.integration.conftest import mqtt_route, node, wait_until
from tests.integration.helpers import CONNACK_OK, dial, local_port, recv_exact

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

COUNT = 40


def test_a_worker_holding_most_sessions_gives_some_to_the_other(mosquitto, gproxy):
    broker = mosquitto()
    gp = gproxy([mqtt_route([node(broker)], level=4)], workers=2, config={"gproxy": {
        "workers": {"rebalance": {"interval": 0.5, "min_gap": 10, "ratio": 1.2}}}})
    clients = {}
    for i in range(COUNT):
        sock = dial(gp.port)
        sock.sendall(packets.connect_v311("rb-%02d" % i))
        assert recv_exact(sock, 4) == CONNACK_OK
        clients[local_port(sock)] = sock
    listed = wait_until(lambda: _sessions(gp, COUNT), 10)
    by_worker = {}
    for s in listed:
        by_worker.setdefault(s["id"].partition("-")[0], []).append(s)
    if len(by_worker) < 2:
        pytest.skip("the kernel gave every connection to one worker")
    mark = gp.mark()
    emptied, kept = sorted(by_worker, key=lambda pid: len(by_worker[pid]))
    for s in by_worker[emptied]:  # one worker's clients all leave
        clients.pop(s["client_port"]).close()
    line = gp.wait_for_log("rebalance: moved", timeout=20, since=mark)
    moved = int(line.split("moved ")[1].split()[0])
    left = len(by_worker[kept])
    assert moved == left // 2, line  # down to the average: half the gap
    time.sleep(0.5)
    for sock in clients.values():  # every session, moved or not, still relays
        sock.sendall(packets.pingreq())
        assert recv_exact(sock, 2) == b"\xd0\x00"
    stats = gp.admin("GET", "/gproxy/stats")[1]
    assert stats["live_sessions"] == left
    # evicting a session finds it whichever worker holds it now
    victim = by_worker[kept][0]
    status, body = gp.admin("DELETE", "/gproxy/sessions?ids=%s" % victim["id"])
    assert status == 200, body
    sock = clients.pop(victim["client_port"])
    sock.settimeout(5)
    assert sock.recv(10) == b""  # 3.1.1: the broker got a DISCONNECT, the client a close
    for sock in clients.values():
        sock.close()


def _sessions(gp, count):
    status, body = gp.admin("GET", "/gproxy/sessions?page_size=100")
    return body["list"] if status == 200 and len(body["list"]) == count else None
