"""Fleet operations with real processes: paged session lists, evictions at a
rate, Wills, rebalancing after a broker is added, and a drain.

mosquitto brokers, paho clients (and raw-socket MQTT clients where hundreds
are needed), gproxy as a child process (one process and ``--workers 2``).
The expected nodes come from ``ApisixRing`` in helpers.py, a model written
from the spec and not from gproxy.  A Will that should not be published is
checked against a control: a client that does die (socket closed without
DISCONNECT) behind it, whose Will must arrive, so "no Will" is not just "not
yet".
"""

import collections
import resource
import selectors
import socket
import time

import pytest

from tests import needs, packets
from tests.integration.conftest import mqtt_route, node, wait_until
from tests.integration.helpers import CONNACK_OK, ApisixRing, Paho, dial, recv_exact
from tests.integration.test_admin_e2e import (ADMIN, admin, with_admin,  # noqa: F401
                                              workers_gproxy)

needs.module("paho.mqtt.client", "bash scripts/venv.sh test")
pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

SESSIONS = ADMIN + "/gproxy/sessions"


def setup_module():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:  # a thousand clients, and the brokers we start inherit it
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- helpers ------------------------------------------------------------------------

def raw_clients(port, ids, wills=False, level=4):
    """``{client_id: socket}`` of MQTT sessions through ``port`` (CONNACK checked)."""
    socks = {}
    try:
        for cid in ids:
            sock = dial(port)
            socks[cid] = sock
            kw = {"will_topic": "will/" + cid, "will_payload": b"died", "will_qos": 1} \
                if wills else {}
            sock.sendall(packets.connect(cid, level, **kw))
            packets.assert_packet(recv_exact(sock, 4), CONNACK_OK, "CONNACK for %s" % cid)
    except BaseException:
        close_all(socks.values())
        raise
    return socks


def close_all(socks):
    for sock in socks:
        sock.close()


def close_times(socks, timeout):
    """``{socket: monotonic time it saw EOF or a reset}`` for those closed in time."""
    sel = selectors.DefaultSelector()
    for sock in socks:
        sel.register(sock, selectors.EVENT_READ)
    closed = {}
    deadline = time.monotonic() + timeout
    while len(closed) < len(socks) and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.5):
            try:
                data = key.fileobj.recv(4096)
            except (ConnectionResetError, socket.timeout):
                data = b""
            if not data:
                closed[key.fileobj] = time.monotonic()
                sel.unregister(key.fileobj)
    sel.close()
    return closed


def rate_of(times):
    t = sorted(times)
    return (len(t) - 1) / (t[-1] - t[0])


def listed(gp, query=""):
    """Every session the Admin API lists for ``query``, page by page (500 a page)."""
    out, page = [], 1
    while True:
        status, body = admin(gp.admin_port, "GET", "%s?page=%d&page_size=500&%s"
                             % (SESSIONS, page, query))
        assert status == 200, body
        out += body["list"]
        if len(out) >= body["total"] or not body["list"]:
            return out
        page += 1


def stats(gp):
    return admin(gp.admin_port, "GET", ADMIN + "/gproxy/stats")[1]


def wait_live(gp, n, timeout=20):
    assert wait_until(lambda: stats(gp)["live_sessions"] == n, timeout), stats(gp)


def wait_job(gp, job_id, timeout=30):
    def finished():
        job = admin(gp.admin_port, "GET", ADMIN + "/gproxy/evictions/" + job_id)[1]
        return job if job["state"] != "running" else None
    job = wait_until(finished, timeout, interval=0.1)
    assert job, "eviction %s did not finish" % job_id
    return job


def ids_on(ring, addr, count, prefix):
    """``count`` client ids the ring places on ``addr``."""
    out, i = [], 0
    while len(out) < count:
        cid = "%s-%05d" % (prefix, i)
        if ring.pick(cid) == addr:
            out.append(cid)
        i += 1
    return out


def chash_upstream(*brokers):
    return {"type": "chash", "key": "mqtt_client_id",
            "nodes": [node(b) for b in brokers]}


def mqtt_route_to(upstream_id, level=4):
    return {"plugins": {"mqtt-proxy": {"protocol_name": "MQTT", "protocol_level": level}},
            "upstream_id": upstream_id}


# -- the sessions list ----------------------------------------------------------------

def test_pages_and_filters_over_hundreds_of_paho_clients(mosquitto, gproxy):
    a, b = mosquitto("a"), mosquitto("b")
    gp = with_admin(gproxy([mqtt_route([node(a), node(b)])]))
    ring = ApisixRing([(a.host, a.port, 1), (b.host, b.port, 1)])
    clients = {}
    try:
        for i in range(300):
            cid = "fleet-%03d" % i
            source = "127.0.0.2" if i % 3 == 0 else None  # a second client address
            clients[cid] = Paho(cid, gp.port, source=source).connect()
        wait_live(gp, 300)

        seen = []
        for page in range(1, 7):
            status, body = admin(gp.admin_port, "GET",
                                 SESSIONS + "?page=%d&page_size=50&sort=client_id" % page)
            assert status == 200 and body["total"] == 300 and len(body["list"]) == 50
            seen += [s["client_id"] for s in body["list"]]
        assert seen == sorted(clients)

        per_node = stats(gp)["per_node"]
        for broker in (a, b):
            expected = sorted(c for c in clients if ring.pick(c) == broker.addr)
            got = listed(gp, "node=" + broker.addr)
            assert sorted(s["client_id"] for s in got) == expected
            assert per_node[broker.addr] == len(expected)

        second = sorted(c for i, c in enumerate(sorted(clients)) if i % 3 == 0)
        assert sorted(s["client_id"] for s in listed(gp, "client_addr=127.0.0.2")) == second
        assert len(listed(gp, "client_addr=127.0.0.0/30")) == 300
        status, body = admin(gp.admin_port, "GET", SESSIONS + "?client_id=fleet-1&page_size=10")
        assert body["total"] == 100 and len(body["list"]) == 10
        assert all("fleet-1" in s["client_id"] for s in body["list"])

        clients["fleet-123"].publish("fleet/big", b"x" * 5000, qos=1)
        status, body = admin(gp.admin_port, "GET", SESSIONS + "?sort=-bytes_in&page_size=10")
        assert body["list"][0]["client_id"] == "fleet-123"
        assert body["list"][0]["bytes_in"] > 5000
    finally:
        for client in clients.values():
            client.close()


def test_pages_span_two_workers_and_evictions_reach_both(mosquitto, workers_gproxy):
    a, b = mosquitto("a"), mosquitto("b")
    gp = with_admin(workers_gproxy([mqtt_route([node(a), node(b)])]))
    ring = ApisixRing([(a.host, a.port, 1), (b.host, b.port, 1)])
    ids = ["w-%03d" % i for i in range(240)]
    socks = raw_clients(gp.port, ids)
    try:
        wait_live(gp, 240)
        seen, last = [], None
        for page in range(1, 11):
            status, body = admin(gp.admin_port, "GET",
                                 SESSIONS + "?page=%d&page_size=25&sort=-connected_at" % page)
            assert body["total"] == 240 and len(body["list"]) == (25 if page < 10 else 15)
            for s in body["list"]:
                assert last is None or s["connected_at"] <= last
                last = s["connected_at"]
            seen += [s["client_id"] for s in body["list"]]
        assert sorted(seen) == ids
        workers = collections.Counter(s["id"].split("-")[0] for s in listed(gp))
        assert len(workers) == 2, workers  # SO_REUSEPORT spread them over both

        on_a = [c for c in ids if ring.pick(c) == a.addr]
        assert sorted(s["client_id"] for s in listed(gp, "node=" + a.addr)) == on_a
        status, job = admin(gp.admin_port, "DELETE", SESSIONS + "?node=%s&rate=400" % a.addr)
        assert status == 200 and job["total"] == len(on_a)
        closed = close_times([socks[c] for c in on_a], timeout=10)
        assert len(closed) == len(on_a)
        assert wait_job(gp, job["id"])["done"] == len(on_a)
        wait_live(gp, 240 - len(on_a))
        assert {s["node"] for s in listed(gp)} == {b.addr}
    finally:
        close_all(socks.values())


# -- evictions ---------------------------------------------------------------------------

def test_evict_at_50_per_second_closes_at_that_rate(mosquitto, gproxy):
    a = mosquitto("a")
    gp = with_admin(gproxy([mqtt_route([node(a)], type_="roundrobin")]))
    ids = ["rate-%03d" % i for i in range(100)]
    socks = raw_clients(gp.port, ids)
    try:
        wait_live(gp, 100)
        status, job = admin(gp.admin_port, "DELETE", SESSIONS + "?node=%s&rate=50" % a.addr)
        assert status == 200 and (job["total"], job["rate"]) == (100, 50)
        closed = close_times(list(socks.values()), timeout=15)
        assert len(closed) == 100
        rate = rate_of(closed.values())
        print("evict at 50/s: measured %.1f sessions/s over %d" % (rate, len(closed)))
        assert 40 <= rate <= 60, rate
        job = wait_job(gp, job["id"])
        assert (job["done"], job["gone"], job["failed"]) == (100, 0, 0)
        # the broker saw a DISCONNECT from each (mosquitto: "disconnected", not
        # "closed its connection"), so no Will would be published
        assert wait_until(lambda: len(a.log.find(" disconnected.")) >= 100, 5)
        assert not [ln for ln in a.log.find("closed its connection") if "rate-" in ln]
    finally:
        close_all(socks.values())


def test_evicted_clients_with_wills_publish_none_and_v5_hears_0x9c(mosquitto, gproxy):
    a = mosquitto("a")
    ref = "broker-b.example:1883"

    def routes(ports):
        return [mqtt_route([node(a)], route_id=1, level=4, type_="roundrobin",
                           server_port=ports[0]),
                mqtt_route([node(a)], route_id=2, level=5, type_="roundrobin",
                           server_port=ports[1])]
    gp = with_admin(gproxy(routes, listeners=2,
                           config={"gproxy": {"evict": {"server_reference": ref}}}))
    clients = []
    with Paho("will-watcher", a.port) as watcher:
        watcher.subscribe("will/#", qos=1)
        try:
            import paho.mqtt.client as mqtt
            for i, (proto, port) in enumerate([(mqtt.MQTTv311, gp.ports[0])] * 3
                                              + [(mqtt.MQTTv5, gp.ports[1])] * 3):
                client = Paho("willed-%d" % i, port, protocol=proto)
                client.client.will_set("will/willed-%d" % i, b"died", qos=1)
                clients.append(client.connect())
            wait_live(gp, 6)
            status, job = admin(gp.admin_port, "DELETE", SESSIONS + "?all=true&rate=20")
            assert status == 200 and job["total"] == 6
            for client in clients:
                assert client.disconnected.wait(10), client.client._client_id
            for client in clients[3:]:
                assert client.disconnect_reason.value == 0x9C, client.disconnect_reason
                assert client.disconnect_properties.ServerReference == ref
            assert wait_job(gp, job["id"])["done"] == 6

            control = raw_clients(gp.ports[0], ["control"], wills=True)["control"]
            control.close()  # dies without DISCONNECT: its Will must come
            message = watcher.expect_message(timeout=10)
            assert message.topic == "will/control"
            assert watcher.messages.empty(), watcher.messages.get().topic
        finally:
            for client in clients:
                client.close()


# -- rebalancing --------------------------------------------------------------------------

def test_added_broker_misplaced_list_matches_the_ring_and_moving_lands_everyone(mosquitto,
                                                                               gproxy):
    a, b, c = mosquitto("a"), mosquitto("b"), mosquitto("c")
    gp = with_admin(gproxy([]))
    assert admin(gp.admin_port, "PUT", ADMIN + "/upstreams/u", chash_upstream(a, b))[0] == 201
    assert admin(gp.admin_port, "PUT", ADMIN + "/stream_routes/1", mqtt_route_to("u"))[0] == 201
    old = ApisixRing([(x.host, x.port, 1) for x in (a, b)])
    new = ApisixRing([(x.host, x.port, 1) for x in (a, b, c)])
    ids = ["move-%03d" % i for i in range(150)]
    socks = raw_clients(gp.port, ids)
    try:
        wait_live(gp, 150)
        assert {s["client_id"]: s["node"] for s in listed(gp)} == {i: old.pick(i) for i in ids}
        assert listed(gp, "misplaced=true") == []

        status, _ = admin(gp.admin_port, "PATCH", ADMIN + "/upstreams/u",
                          {"nodes": chash_upstream(a, b, c)["nodes"]})
        assert status == 200
        expected = {i: new.pick(i) for i in ids if new.pick(i) != old.pick(i)}
        assert expected and set(expected.values()) == {c.addr}
        got = {s["client_id"]: s["move_to"] for s in listed(gp, "misplaced=true")}
        assert got == expected
        summary = admin(gp.admin_port, "GET", SESSIONS + "?misplaced=true&page_size=10")[1]
        assert summary["total"] == len(expected)
        assert summary["per_node"] == dict(collections.Counter(old.pick(i) for i in expected))

        status, job = admin(gp.admin_port, "DELETE", SESSIONS + "?misplaced=true&rate=100")
        assert job["total"] == len(expected)
        closed = close_times([socks[i] for i in expected], timeout=10)
        assert len(closed) == len(expected)
        stay = [socks[i] for i in ids if i not in expected]
        assert not close_times(stay, timeout=0.5), "a session that was in place was moved"
        for i in expected:  # the clients reconnect
            socks.pop(i).close()
        socks.update(raw_clients(gp.port, list(expected)))
        wait_live(gp, 150)
        assert {s["client_id"]: s["node"] for s in listed(gp)} == {i: new.pick(i) for i in ids}
        assert listed(gp, "misplaced=true") == []
        for i in expected:
            c.wait_for_client(i)
    finally:
        close_all(socks.values())


def test_drain_a_node_of_1000_sessions_at_200_per_second_publishes_no_will(mosquitto, gproxy):
    a, b = mosquitto("a"), mosquitto("b")
    gp = with_admin(gproxy([]))
    assert admin(gp.admin_port, "PUT", ADMIN + "/upstreams/u", chash_upstream(a, b))[0] == 201
    assert admin(gp.admin_port, "PUT", ADMIN + "/stream_routes/1", mqtt_route_to("u"))[0] == 201
    ring = ApisixRing([(x.host, x.port, 1) for x in (a, b)])
    on_a = ids_on(ring, a.addr, 1000, "drain-a")
    on_b = ids_on(ring, b.addr, 20, "drain-b")
    with Paho("watch-a", a.port) as watch_a, Paho("watch-b", b.port) as watch_b:
        for watcher in (watch_a, watch_b):
            watcher.subscribe("will/#", qos=1)
        socks = raw_clients(gp.port, on_a + on_b, wills=True)
        try:
            wait_live(gp, 1020)
            assert stats(gp)["per_node"] == {a.addr: 1000, b.addr: 20}
            # the drain: weight 0 (APISIX's way; the old weight kept in the node's
            # metadata, as the dashboard does), then evict the node's sessions
            drained = [dict(node(a, 0), metadata={"gproxy_weight": 1}), node(b)]
            status, _ = admin(gp.admin_port, "PATCH", ADMIN + "/upstreams/u", {"nodes": drained})
            assert status == 200
            started = time.monotonic()
            status, job = admin(gp.admin_port, "DELETE", SESSIONS + "?node=%s&rate=200" % a.addr)
            assert status == 200 and job["total"] == 1000
            closed = close_times([socks[i] for i in on_a], timeout=30)
            assert len(closed) == 1000
            rate = rate_of(closed.values())
            assert 160 <= rate <= 240, rate
            job = wait_job(gp, job["id"])
            assert job["done"] == 1000

            after = raw_clients(gp.port, on_a[:5])  # reconnecting clients avoid a
            socks.update({"again-" + k: v for k, v in after.items()})
            wait_until(lambda: stats(gp)["per_node"].get(b.addr) == 25, 10)
            assert stats(gp)["per_node"] == {b.addr: 25}

            socks.pop(on_b[0]).close()  # the control: this one dies, its Will comes
            assert watch_b.expect_message(timeout=10).topic == "will/" + on_b[0]
            wills = watch_a.messages.qsize() + watch_b.messages.qsize()
            print("drain of 1000 sessions at 200/s: measured %.1f/s, %.2fs in all, "
                  "%d Wills published" % (rate, max(closed.values()) - started, wills))
            assert wills == 0
        finally:
            close_all(socks.values())
