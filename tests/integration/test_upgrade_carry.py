"""A live upgrade (SIGUSR2) carries what the process keeps besides sessions.

Real gproxy processes, real brokers (mosquitto), raw-socket MQTT clients:

* a route chosen by the CONNECT (``vars``, the refine phase) on a least_conn
  upstream: the moved session keeps its route id, goes on counting on its
  node in the new process (the next client goes to the other node) and
  gives the count back there when it ends; its access log line comes from
  the new process, with the route id;
* an eviction job at a rate, half done: it goes on in the new process under
  the same id and ends every session once;
* on etcd, the fleet: the instance's registry key is never deleted, never
  says draining, keeps its boot time and gets the new pid, and a fleet
  eviction's share running on that instance goes on in the new process;
* DNS discovery with the DNS server dead: the new process serves the old
  one's last good nodes at once.
"""

import json
import os
import signal
import socket
import subprocess
import time

import pytest

from tests import packets
from tests.integration import dnsmasq
from tests.integration.conftest import HOST, mqtt_route, node, wait_until
from tests.integration.etcd import ETCDCTL, etcd, needs_etcd, prefix  # noqa: F401 (fixtures)
from tests.integration.helpers import CONNACK_OK, ApisixRing, recv_exact
from tests.integration.test_dns_discovery import Held, brokers, dns, landed  # noqa: F401
from tests.integration.test_fleet import close_all, close_times, ids_on, raw_clients, wait_job
from tests.integration.test_fleet_etcd import admin, fleet, route_everywhere
from tests.integration.test_upgrade import new_pid, stop_pid

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def upgrade(gp):
    """SIGUSR2, and the new process's pid once the old one has exited."""
    mark = gp.mark()
    gp.proc.send_signal(signal.SIGUSR2)
    pid = new_pid(gp, mark)
    assert gp.proc.wait(timeout=30) == 0, "the old process did not exit cleanly"
    return pid


def connect(port, client_id, username=None):
    sock = socket.create_connection((HOST, port), timeout=5)
    sock.sendall(packets.connect(client_id, 4, username=username))
    packets.assert_packet(recv_exact(sock, 4), CONNACK_OK, "CONNACK for %s" % client_id)
    return sock


def test_a_refined_route_and_its_least_conn_count_move_with_the_session(gproxy, mosquitto):
    a, b = mosquitto("a"), mosquitto("b")
    tenant = {"id": "tenant-b", "plugins": {"mqtt-proxy": {
        "protocol_level": 4, "vars": [["mqtt_username", "==", "tenant-b"]], "priority": 5}},
        "upstream": {"type": "least_conn", "nodes": [node(a), node(b)]}}
    fallback = mqtt_route([node(a)], route_id="default", type_="roundrobin")
    gp = gproxy([tenant, fallback], config={"nginx_config": {"stream": {
        "enable_access_log": True, "access_log": "logs/stream.log",
        "access_log_format": "$pid $mqtt_client_id $route_id $upstream_addr"}}})
    first = connect(gp.port, "lc-1", "tenant-b")  # least_conn's tie: the first node, a
    a.wait_for_client("lc-1")
    listed = gp.admin("GET", "/gproxy/sessions")[1]["list"]
    assert [(s["client_id"], s["route_id"], s["node"]) for s in listed] == [
        ("lc-1", "tenant-b", a.addr)]
    pid = upgrade(gp)
    socks = [first]
    try:
        listed = gp.admin("GET", "/gproxy/sessions")[1]["list"]  # the new process's view
        assert [(s["client_id"], s["route_id"], s["node"]) for s in listed] == [
            ("lc-1", "tenant-b", a.addr)]
        socks.append(connect(gp.port, "lc-2", "tenant-b"))  # a holds lc-1: b
        b.wait_for_client("lc-2")
        first.sendall(packets.pingreq())  # the moved session relays
        assert recv_exact(first, 2) == b"\xd0\x00"
        first.close()  # it ends in the new process: a's count goes back to 0
        assert wait_until(lambda: gp.admin("GET", "/gproxy/stats")[1]["live_sessions"] == 1,
                          10)
        socks.append(connect(gp.port, "lc-3", "tenant-b"))  # a 0, b 1: a
        a.wait_for_client("lc-3")
        path = os.path.join(gp.dir, "logs", "stream.log")

        def lines():
            try:
                with open(path) as fh:
                    return [line.split() for line in fh.read().splitlines()]
            except FileNotFoundError:
                return []
        assert wait_until(lambda: lines(), 10)  # one line, whole, from the new process
        assert lines() == [[str(pid), "lc-1", "tenant-b", a.addr]]
    finally:
        close_all(socks)
        stop_pid(pid)


@pytest.mark.parametrize("workers", [1, 2])
def test_an_eviction_job_goes_on_in_the_new_process(gproxy, mosquitto, workers):
    """With --workers the job is the parent's (it asks every worker): it goes on in
    the new parent, whose workers hold the sessions by then."""
    broker = mosquitto()
    gp = gproxy([mqtt_route([node(broker)], level=4, type_="roundrobin")], workers=workers)
    socks = raw_clients(gp.port, ["ev-%02d" % i for i in range(12)])
    pid = None
    try:
        status, job = gp.admin("DELETE", "/gproxy/sessions?route_id=1&rate=2")  # 5.5 s
        started = time.monotonic()
        assert status == 200 and job["total"] == 12
        time.sleep(1.2)  # three ended by the old process, then the upgrade
        pid = upgrade(gp)
        closed = close_times(list(socks.values()), timeout=30)
        assert len(closed) == 12
        done = wait_job(gp, job["id"], timeout=30)  # the same job, asked of the new process
        assert (done["state"], done["done"], done["gone"], done["failed"]) == ("done", 12, 0, 0)
        # still paced (the 12th at 5.5 s, later by the pause), no catch-up burst after it
        assert max(closed.values()) - started >= 5.0
        assert gp.wait_for_log("upgrade: eviction jobs %s go on here" % job["id"], timeout=5)
    finally:
        close_all(socks.values())
        if pid is not None:
            stop_pid(pid)


def key_history(etcd_server, key, since):
    """Every change of ``key`` from revision ``since`` on: ``[(deleted, value or None)]``."""
    try:
        out = subprocess.run([ETCDCTL, "--endpoints", etcd_server.url, "watch", "--rev",
                              str(since), key, "-w", "json"], capture_output=True, text=True,
                             timeout=3, env=dict(os.environ, ETCDCTL_API="3")).stdout
    except subprocess.TimeoutExpired as exc:  # it watches on: what it printed is history
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
    import base64
    changes = []
    for line in out.splitlines():
        if not line.startswith("{"):
            continue
        for event in json.loads(line).get("Events") or ():
            deleted = event.get("type") == 1
            value = None if deleted else json.loads(base64.b64decode(event["kv"]["value"]))
            changes.append((deleted, value))
    return changes


@needs_etcd
def test_the_instance_stays_registered_and_its_fleet_share_goes_on(etcd, gproxy, mosquitto,
                                                                    prefix):
    x, y = mosquitto("x"), mosquitto("y")
    gp, other = fleet(gproxy, etcd, prefix, count=2)
    route_everywhere([gp, other], x, y)
    key = prefix + "/data_plane/server_info/gp-0"
    before = etcd.get(key)
    ring = ApisixRing([(h.host, h.port, 1) for h in (x, y)])
    on_x = ids_on(ring, x.addr, 16, "moving")
    socks = raw_clients(gp.port, on_x)  # every one on the instance that upgrades
    pid = None
    try:
        status, job = admin(other, "DELETE", "/gproxy/sessions?node=%s&rate=2&fleet=true"
                            % x.addr)  # started elsewhere; gp-0's share: 16 at 2/s
        assert status == 200 and job["total"] == 16, job
        time.sleep(1.0)
        pid = upgrade(gp)
        gp.wait_for_log("fleet eviction %s: this instance's share goes on here" % job["id"],
                        timeout=5)
        closed = close_times(list(socks.values()), timeout=40)
        assert len(closed) == 16
        done = wait_job(other, job["id"], timeout=30)
        share = {s["instance"]: s for s in done["instances"]}["gp-0"]
        assert (done["state"], share["state"], share["done"], share["gone"],
                share["failed"]) == ("done", "done", 16, 0, 0), done
        after = etcd.get(key)
        assert after["create_revision"] == before["create_revision"]  # never deleted
        assert after["value"]["gproxy"]["pid"] == pid
        assert after["value"]["boot_time"] == before["value"]["boot_time"]
        history = key_history(etcd, key, before["mod_revision"])
        assert history and not [v for deleted, v in history if deleted]
        assert not [v for _, v in history if v["gproxy"]["draining"]], history
        listed = admin(other, "GET", "/gproxy/instances")[1]["list"]
        assert sorted((i["id"], i["pid"]) for i in listed) == sorted(
            [("gp-0", pid), ("gp-1", other.proc.pid)])
    finally:
        close_all(socks.values())
        if pid is not None:
            stop_pid(pid)


def test_the_new_process_serves_the_last_good_dns_answer_when_the_dns_is_dead(
        gproxy, dns, brokers):  # noqa: F811 (fixtures)
    b2, b3 = brokers("127.0.0.2"), brokers("127.0.0.3")
    server = dns(hosts=[("127.0.0.2", "up.svc.test"), ("127.0.0.3", "up.svc.test")])
    name = "up.svc.test:%d" % b2.port
    route = mqtt_route([], route_id=1)
    route["upstream"] = {"type": "chash", "key": "mqtt_client_id", "discovery_type": "dns",
                         "service_name": name}
    gp = gproxy([route], config={"discovery": {"dns": {"servers": [server.server]}}})
    held = Held(gp.port)
    pid = None
    try:
        held.open("dns-held")
        mark = gp.mark()
        server.kill()
        pid = upgrade(gp)
        assert not gp.find("no valid upstream node", since=mark)
        ring = ApisixRing([(b.host, b2.port, 1) for b in (b2, b3)])
        fresh = ["dns-new-%d" % i for i in range(8)]
        for cid in fresh:  # at once: no wait for a DNS that will not answer
            held.open(cid)
        assert landed([b2, b3], fresh) == {cid: ring.pick(cid) for cid in fresh}
        assert held.all_alive()
    finally:
        held.close()
        if pid is not None:
            stop_pid(pid)
