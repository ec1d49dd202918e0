"""Three gproxy instances on one etcd, seen and driven as one fleet.

A real etcd (Debian's), real mosquitto brokers, gproxy as three child
processes on one key prefix, raw-socket MQTT clients (with Wills where a
drain must not publish them) spread over the three.  The expected nodes come
from ``ApisixRing`` (helpers.py), a model written from the spec.  Rates are
measured from the clients' side: the time each socket saw its end.  ``-s``
prints the figures.
"""

import collections
import concurrent.futures
import json
import os
import signal
import time
import urllib.request

import pytest

from tests import needs
from tests.integration.conftest import wait_listening, wait_until
from tests.integration.etcd import etcd, needs_etcd, prefix  # noqa: F401 (fixtures)
from tests.integration.helpers import ApisixRing, Paho, http_call
from tests.integration.test_fleet import (chash_upstream, close_all, close_times, ids_on,
                                          mqtt_route_to, raw_clients, rate_of)

needs.module("paho.mqtt.client", "bash scripts/venv.sh test")
pytestmark = [pytest.mark.integration, pytest.mark.timeout(240), needs_etcd]
KEY = "edd1c9f034335f136f87ad84b625c8f1"
TTL = 3  # plugin_attr.server-info.report_ttl: APISIX's smallest
WAIT = 10.0


def setup_module():
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:  # hundreds of clients, and the processes we start inherit it
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def admin(proxy, method, path, body=None, timeout=15.0):
    status, raw = http_call(proxy.admin_port, method, "/apisix/admin" + path,
                            None if body is None else json.dumps(body), {"X-API-KEY": KEY},
                            timeout)
    return status, json.loads(raw or b"{}")


def fleet(make, etcd, prefix, count=3, named=True, workers=None, **extra):
    """``count`` instances on ``etcd`` under ``prefix`` (ids gp-0, gp-1, ... if ``named``);
    ``workers``: ``{index: N}`` for instances run with ``--workers N``; ``extra``: more
    config sections."""
    out = []
    for i in range(count):
        config = etcd.etcd_config(prefix)
        config["plugin_attr"] = {"server-info": {"report_ttl": TTL}}
        if named:
            config["apisix"] = {"id": "gp-%d" % i}
        for section, values in extra.items():
            config.setdefault(section, {}).update(values)
        proxy = make([], config=config, workers=(workers or {}).get(i, 1))
        wait_listening(proxy.admin_port, proxy.proc, what="gproxy admin")
        out.append(proxy)
    assert wait_until(lambda: admin(out[0], "GET", "/gproxy/instances")[1]["total"] == count,
                      WAIT)
    return out


def route_everywhere(instances, *brokers):
    """Upstream ``u`` (chash over ``brokers``) and route 1, served by every instance."""
    first = instances[0]
    assert admin(first, "PUT", "/upstreams/u", chash_upstream(*brokers))[0] in (200, 201)
    assert admin(first, "PUT", "/stream_routes/1", mqtt_route_to("u"))[0] in (200, 201)
    for proxy in instances:
        assert wait_until(lambda p=proxy: admin(p, "GET", "/stream_routes/1")[0] == 200, WAIT)


def fleet_sessions(proxy, query=""):
    """Every session the fleet lists for ``query``, page by page, as ``instance`` sees it."""
    out, page = [], 1
    while True:
        status, body = admin(proxy, "GET", "/gproxy/sessions?fleet=true&page=%d&page_size=500&%s"
                             % (page, query))
        assert status == 200 and body["unreachable"] == [], body
        out += body["list"]
        if len(out) >= body["total"] or not body["list"]:
            return out
        page += 1


def dealt(instances, a, b, count, tag, socks, by_instance):
    """``count`` sessions the ring puts on broker ``a`` (of a and b), dealt round the
    instances; fills ``socks`` ({client id: socket}) and ``by_instance`` ({index: ids})."""
    on_a = ids_on(ApisixRing([(x.host, x.port, 1) for x in (a, b)]), a.addr, count, tag)
    for i, cid in enumerate(on_a):
        socks.update(raw_clients(instances[i % len(instances)].port, [cid]))
        by_instance[i % len(instances)].append(cid)
    return on_a


def wait_job(proxy, job_id, timeout=30):
    def finished():
        job = admin(proxy, "GET", "/gproxy/evictions/" + job_id)[1]
        return job if job.get("state") not in (None, "running") else None
    job = wait_until(finished, timeout, interval=0.2)
    assert job, "fleet eviction %s did not finish" % job_id
    return job


# -- the registry -----------------------------------------------------------------------

def test_registry_lists_three_and_drops_a_killed_one_within_the_ttl(etcd, gproxy, mosquitto,
                                                                     prefix):
    broker = mosquitto()
    a, b, c = fleet(gproxy, etcd, prefix, named=False)
    ids = []
    for proxy in (a, b, c):  # APISIX's id: made once and kept in apisix.uid
        with open(os.path.join(proxy.dir, "apisix.uid")) as fh:
            ids.append(fh.read().strip())
    body = admin(b, "GET", "/gproxy/instances")[1]
    assert sorted(i["id"] for i in body["list"]) == sorted(ids)
    assert [i["id"] for i in body["list"] if i["self"]] == [ids[1]]
    # APISIX's record, where APISIX's tooling looks for it
    with urllib.request.urlopen(etcd.url + "/version", timeout=5) as resp:
        version = json.load(resp)
    record = etcd.get(prefix + "/data_plane/server_info/" + ids[0])["value"]
    assert record["id"] == ids[0] and record["etcd_version"] == version["etcdcluster"]
    assert isinstance(record["boot_time"], int) and record["hostname"] and record["version"]
    assert record["gproxy"]["admin"] == "http://127.0.0.1:%d" % a.admin_port
    assert record["gproxy"]["draining"] is False
    # live sessions, per instance and summed per node, asked fresh of each instance
    route = {"plugins": {"mqtt-proxy": {"protocol_level": 4}},
             "upstream": {"type": "roundrobin", "nodes": [
                 {"host": broker.host, "port": broker.port, "weight": 1}]}}
    assert admin(a, "PUT", "/stream_routes/1", route)[0] == 201
    for proxy in (b, c):
        assert wait_until(lambda p=proxy: admin(p, "GET", "/stream_routes/1")[0] == 200, WAIT)
    clients = [Paho("reg-%d" % i, p.port).connect() for i, p in enumerate([a] * 3 + [b] * 2 + [c])]
    try:
        body = admin(c, "GET", "/gproxy/instances")[1]
        live = {i["id"]: i["live_sessions"] for i in body["list"]}
        assert live == {ids[0]: 3, ids[1]: 2, ids[2]: 1}
        assert body["per_node"] == {broker.addr: 6}
    finally:
        for client in clients:
            client.close()
    # kill -9: the record goes when its lease runs out
    c.proc.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    assert wait_until(lambda: admin(a, "GET", "/gproxy/instances")[1]["total"] == 2,
                      TTL + 3, interval=0.05)
    gone_after = time.monotonic() - killed
    print("registry: a kill -9ed instance left after %.2fs (report_ttl %ds)" % (gone_after, TTL))
    assert gone_after <= TTL + 1.0  # etcd checks for expired leases every 500 ms
    # a clean stop leaves at once
    b.stop()
    assert etcd.get(prefix + "/data_plane/server_info/" + ids[1]) is None
    assert [i["id"] for i in admin(a, "GET", "/gproxy/instances")[1]["list"]] == [ids[0]]


# -- fleet-wide queries -------------------------------------------------------------------

def test_a_client_id_is_found_on_the_instance_that_holds_it(etcd, gproxy, mosquitto, prefix):
    x, y = mosquitto("x"), mosquitto("y")
    instances = fleet(gproxy, etcd, prefix, workers={2: 2}, gproxy={"fleet": {"timeout": 1}})
    route_everywhere(instances, x, y)
    holder = {}
    socks = {}
    try:
        for i in range(30):
            cid = "dev-%02d" % i
            proxy = instances[i % 3]
            socks.update(raw_clients(proxy.port, [cid]))
            holder[cid] = "gp-%d" % (i % 3)
        body = admin(instances[0], "GET", "/gproxy/sessions?fleet=true&client_id=dev-17")[1]
        assert body["total"] == 1 and body["unreachable"] == []
        assert [(s["client_id"], s["instance"]) for s in body["list"]] == [("dev-17", "gp-2")]
        # one page at a time across the fleet, in order, nothing twice
        seen = []
        for page in (1, 2, 3):
            body = admin(instances[1], "GET", "/gproxy/sessions?fleet=true&sort=client_id"
                         "&page_size=10&page=%d" % page)[1]
            assert body["total"] == 30
            seen += [(s["client_id"], s["instance"]) for s in body["list"]]
        assert seen == sorted(holder.items())
        assert {i["id"]: i["total"] for i in body["instances"]} == {
            "gp-0": 10, "gp-1": 10, "gp-2": 10}
        # an instance that does not answer is named, and the answer still comes in time
        os.kill(instances[2].proc.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            status, body = admin(instances[0], "GET", "/gproxy/sessions?fleet=true")
            took = time.monotonic() - started
        finally:
            os.kill(instances[2].proc.pid, signal.SIGCONT)
        assert status == 200 and took < 3.0, took
        assert body["total"] == 20
        assert [(u["id"], u["error"]) for u in body["unreachable"]] == [("gp-2", "timeout")]
    finally:
        close_all(socks.values())


# -- fleet-wide evictions ------------------------------------------------------------------

def test_fleet_drain_of_600_sessions_runs_at_100_per_second_and_publishes_no_will(
        etcd, gproxy, mosquitto, prefix):
    a, b = mosquitto("a"), mosquitto("b")
    instances = fleet(gproxy, etcd, prefix)
    route_everywhere(instances, a, b)
    ring = ApisixRing([(x.host, x.port, 1) for x in (a, b)])
    on_a = ids_on(ring, a.addr, 600, "drain")
    on_b = ids_on(ring, b.addr, 30, "stay")
    spread = {0: on_a[:300] + on_b[:10], 1: on_a[300:500] + on_b[10:20],
              2: on_a[500:] + on_b[20:]}
    with Paho("watch-a", a.port) as watch_a, Paho("watch-b", b.port) as watch_b:
        for watcher in (watch_a, watch_b):
            watcher.subscribe("will/#", qos=1)
        socks = {}
        try:
            for index, ids in spread.items():
                socks.update(raw_clients(instances[index].port, ids, wills=True))
            assert wait_until(lambda: admin(instances[2], "GET", "/gproxy/instances")[1][
                "per_node"] == {a.addr: 600, b.addr: 30}, WAIT)
            # the drain: weight 0 (through any instance), then the fleet eviction
            drained = [{"host": a.host, "port": a.port, "weight": 0,
                        "metadata": {"gproxy_weight": 1}},
                       {"host": b.host, "port": b.port, "weight": 1}]
            assert admin(instances[1], "PATCH", "/upstreams/u", {"nodes": drained})[0] == 200
            status, job = admin(instances[0], "DELETE", "/gproxy/sessions?node=%s&rate=100"
                                "&fleet=true" % a.addr)
            assert status == 200 and job["fleet"] and job["total"] == 600, job
            shares = {s["instance"]: (s["total"], s["rate"]) for s in job["instances"]}
            assert {i: t for i, (t, _) in shares.items()} == {"gp-0": 300, "gp-1": 200,
                                                              "gp-2": 100}
            assert sum(r for _, r in shares.values()) == pytest.approx(100)
            assert shares["gp-0"][1] == pytest.approx(50)
            closed = close_times([socks[i] for i in on_a], timeout=30)
            assert len(closed) == 600
            rate = rate_of(closed.values())
            job = wait_job(instances[2], job["id"])  # followed on another instance
            assert (job["state"], job["done"], job["gone"], job["failed"]) == ("done", 600, 0, 0)
            stay = [socks[i] for i in on_b]
            assert not close_times(stay, timeout=0.5), "a session on b was evicted"
            socks.pop(on_b[0]).close()  # the control: this one dies, its Will comes
            assert watch_b.expect_message(timeout=10).topic == "will/" + on_b[0]
            wills = watch_a.messages.qsize() + watch_b.messages.qsize()
            print("fleet drain of 600 sessions over 3 instances at rate=100: measured "
                  "%.1f/s, %.2fs first to last, %d Wills published; shares %s"
                  % (rate, max(closed.values()) - min(closed.values()), wills, shares))
            assert 80 <= rate <= 120, rate
            assert wills == 0
        finally:
            close_all(socks.values())


def test_fleet_rebalance_after_adding_a_broker_moves_exactly_the_misplaced(etcd, gproxy,
                                                                         mosquitto, prefix):
    a, b, c = mosquitto("a"), mosquitto("b"), mosquitto("c")
    instances = fleet(gproxy, etcd, prefix)
    route_everywhere(instances, a, b)
    old = ApisixRing([(x.host, x.port, 1) for x in (a, b)])
    new = ApisixRing([(x.host, x.port, 1) for x in (a, b, c)])
    ids = ["move-%03d" % i for i in range(150)]
    socks, holder = {}, {}
    try:
        for i, cid in enumerate(ids):
            socks.update(raw_clients(instances[i % 3].port, [cid]))
            holder[cid] = "gp-%d" % (i % 3)
        assert fleet_sessions(instances[1], "misplaced=true") == []
        assert admin(instances[2], "PATCH", "/upstreams/u",
                     {"nodes": chash_upstream(a, b, c)["nodes"]})[0] == 200
        expected = {i: new.pick(i) for i in ids if new.pick(i) != old.pick(i)}
        assert expected and set(expected.values()) == {c.addr}

        def listed():
            got = fleet_sessions(instances[1], "misplaced=true")
            return {s["client_id"]: (s["move_to"], s["instance"]) for s in got}
        assert wait_until(lambda: listed() == {i: (n, holder[i]) for i, n in expected.items()},
                          WAIT)
        status, job = admin(instances[1], "DELETE",
                            "/gproxy/sessions?misplaced=true&rate=200&fleet=true")
        assert status == 200 and job["total"] == len(expected), job
        closed = close_times([socks[i] for i in expected], timeout=15)
        assert len(closed) == len(expected)
        stay = [socks[i] for i in ids if i not in expected]
        assert not close_times(stay, timeout=0.5), "a session that was in place was moved"
        job = wait_job(instances[0], job["id"])
        assert (job["state"], job["done"]) == ("done", len(expected))
        print("fleet rebalance: %d of 150 sessions misplaced after adding a broker, "
              "%d moved" % (len(expected), job["done"]))
    finally:
        close_all(socks.values())


def test_stopping_the_instance_that_started_a_job_does_not_stop_it(etcd, gproxy, mosquitto,
                                                                   prefix):
    a, b = mosquitto("a"), mosquitto("b")
    instances = fleet(gproxy, etcd, prefix)
    route_everywhere(instances, a, b)
    socks, by_instance = {}, collections.defaultdict(list)
    try:
        dealt(instances, a, b, 240, "job", socks, by_instance)
        starter = instances[0]
        rest = [socks[c] for i in (1, 2) for c in by_instance[i]]
        watching = concurrent.futures.ThreadPoolExecutor(1)
        status, job = admin(starter, "DELETE", "/gproxy/sessions?node=%s&rate=40&fleet=true"
                            % a.addr)
        closing = watching.submit(close_times, rest, 30)  # from the start of the job
        assert status == 200 and job["total"] == 240 and job["started_by"] == "gp-0", job
        time.sleep(1.5)
        starter.stop()  # SIGTERM mid-way: its own sessions end with its shutdown
        closed = closing.result()
        watching.shutdown()
        assert len(closed) == 160
        job = wait_job(instances[1], job["id"])
        shares = {s["instance"]: s for s in job["instances"]}
        assert job["state"] == "done"
        assert shares["gp-0"]["state"] == "stopped"
        assert (shares["gp-1"]["done"], shares["gp-2"]["done"]) == (80, 80)
        assert job["done"] + job["gone"] + job["failed"] == 240
        rate = rate_of(closed.values())
        print("starter stopped after 1.5s: the other two ended their 160 sessions at "
              "%.1f/s (their part of 40/s: %.1f/s)" % (rate, 40 * 160 / 240))
        assert 40 * 160 / 240 * 0.8 <= rate <= 40 * 160 / 240 * 1.2, rate
    finally:
        close_all(socks.values())


def test_a_job_whose_starter_is_killed_finishes_on_the_others(etcd, gproxy, mosquitto, prefix):
    a, b = mosquitto("a"), mosquitto("b")
    instances = fleet(gproxy, etcd, prefix)
    route_everywhere(instances, a, b)
    socks, by_instance = {}, collections.defaultdict(list)
    try:
        dealt(instances, a, b, 120, "kill", socks, by_instance)
        status, job = admin(instances[0], "DELETE", "/gproxy/sessions?node=%s&rate=30&fleet=true"
                            % a.addr)
        assert status == 200 and job["total"] == 120, job
        time.sleep(0.5)
        instances[0].proc.send_signal(signal.SIGKILL)  # no goodbye: its lease must run out
        closed = close_times([socks[c] for i in (1, 2) for c in by_instance[i]], timeout=20)
        assert len(closed) == 80
        job = wait_job(instances[2], job["id"], timeout=TTL + 10)
        shares = {s["instance"]: s for s in job["instances"]}
        assert job["state"] == "done" and shares["gp-0"]["state"] == "lost"
        assert (shares["gp-1"]["done"], shares["gp-2"]["done"]) == (40, 40)
        assert job["failed"] == 40 - shares["gp-0"]["done"]  # what the dead one had left
    finally:
        close_all(socks.values())
