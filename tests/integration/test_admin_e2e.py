"""The Admin API and the durable store end to end: a real gproxy process, real
mosquitto brokers, paho clients, HTTP over loopback (http.client and curl).

Covers the mqtt-proxy plugin doc's walkthrough with its curl commands verbatim
(only the ports substituted), live apply of route changes without touching
live sessions, closing sessions through gproxy's Admin API extension,
durability of acknowledged writes across ``kill -9``, hand edits of
apisix.yaml (good, broken, good again), the refusal to expose the default
admin key, and ``--workers 2``.  The chash expectations come from a ring
written here from docs/apisix-behaviour.md §5.3, not from gproxy's code.
"""

import bisect
import glob
import http.client
import json
import os
import random
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
import zlib
from math import gcd

import pytest
import yaml

from tests import needs, packets
from tests.integration.conftest import (HOST, MOSQUITTO, Broker, Gproxy, free_port, mqtt_route,
                                        node, stop_process, wait_listening, wait_until)
from tests.integration.helpers import (CONNACK_OK, Paho, dial, expect_closed, http_call, local_port,
                                       recv_exact)

needs.module("paho.mqtt.client", "bash scripts/venv.sh test")

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

KEY = "edd1c9f034335f136f87ad84b625c8f1"
ADMIN = "/apisix/admin"

# The plugin doc's commands, character for character (seed text of the mqtt-proxy doc).
SEED_PUT_ROUNDROBIN = """curl http://127.0.0.1:9080/apisix/admin/stream_routes/1 -H 'X-API-KEY: edd1c9f034335f136f87ad84b625c8f1' -X PUT -d '
{
"plugins": {
"mqtt-proxy": {
"protocol_name": "MQTT",
"protocol_level": 4
}
},
"upstream": {
"type": "roundrobin",
"nodes": [{
"host": "127.0.0.1",
"port": 1980,
"weight": 1
}]
}
}'"""  # noqa: E501

SEED_PUT_CHASH = """curl http://127.0.0.1:9080/apisix/admin/stream_routes/1 -H 'X-API-KEY: edd1c9f034335f136f87ad84b625c8f1' -X PUT -d '
{
"plugins": {
"mqtt-proxy": {
"protocol_name": "MQTT",
"protocol_level": 4
}
},
"upstream": {
"type": "chash",
"key": "mqtt_client_id",
"nodes": [
{
"host": "127.0.0.1",
"port": 1995,
"weight": 1
},
{
"host": "127.0.0.2",
"port": 1995,
"weight": 1
}
]
}
}'"""  # noqa: E501

SEED_DELETE = ("curl http://127.0.0.1:9080/apisix/admin/stream_routes/1 "
               "-H 'X-API-KEY: edd1c9f034335f136f87ad84b625c8f1' -X DELETE")

PINGRESP = bytes.fromhex("d0 00")


# -- APISIX's chash ring, written from §5.3 (base CRC, then crc32(prev_le4, base)) ---

def chash_pick(nodes, key):
    """``host:port`` that resty.chash picks for ``key`` among ``[(host, port, weight)]``."""
    g = 0
    for _, _, weight in nodes:
        g = gcd(g, weight)
    g = g or 1
    points = []
    for host, port, weight in nodes:
        name = "%s:%d" % (host, port)
        base = zlib.crc32(name.replace(":", "\0").encode())
        prev = 0
        for _ in range(160 * (weight // g)):
            prev = zlib.crc32(struct.pack("<I", prev), base)
            points.append((prev, name))
    points.sort()
    i = bisect.bisect_left(points, (zlib.crc32(key.encode()),))
    return points[i % len(points)][1]


def test_chash_model_gives_the_spec_check_values():
    nodes = [("0.0.0.0", 1995, 1), ("127.0.0.1", 1995, 1)]
    expected = {"f": "0.0.0.0:1995", "g": "127.0.0.1:1995", "127.0.0.1": "127.0.0.1:1995",
                "foo": "0.0.0.0:1995", "clint-111": "127.0.0.1:1995",
                "client-1": "127.0.0.1:1995", "client-2": "0.0.0.0:1995"}
    assert {k: chash_pick(nodes, k) for k in expected} == expected


# -- HTTP --------------------------------------------------------------------------

def admin(port, method, path, body=None, key=KEY, timeout=10.0):
    """One Admin API request on a fresh connection: ``(status, json or text)``."""
    status, raw = http_call(port, method, path, body, {"X-API-KEY": key} if key else {}, timeout)
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode("utf-8", "replace")


def seed_runner(transport, admin_port, directory):
    """Run a seed curl command (ports substituted) with curl or http.client."""
    def fix(text):
        return text.replace("127.0.0.1:9080", "127.0.0.1:%d" % admin_port)

    def with_http_client(text):
        argv = shlex.split(fix(text))
        assert argv[0] == "curl"
        method, body, headers, url = "GET", None, {}, None
        args = iter(argv[1:])
        for arg in args:
            if arg == "-X":
                method = next(args)
            elif arg == "-H":
                name, _, value = next(args).partition(":")
                headers[name.strip()] = value.strip()
            elif arg == "-d":
                body = next(args)
            else:
                url = arg
        parts = urllib.parse.urlsplit(url)
        assert (parts.hostname, parts.port) == (HOST, admin_port)
        return admin(admin_port, method, parts.path, body, key=headers["X-API-KEY"])

    curl_home = os.path.join(directory, "curlhome")
    os.makedirs(curl_home, exist_ok=True)
    with open(os.path.join(curl_home, ".curlrc"), "w") as fh:
        # The command text stays verbatim; the status code comes from the rc file.
        fh.write('silent\nshow-error\nwrite-out = "\\n%{http_code}"\n')
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(CURL_HOME=curl_home, XDG_CONFIG_HOME=curl_home, HOME=curl_home)

    def with_curl(text):
        done = subprocess.run(fix(text), shell=True, env=env, capture_output=True, timeout=20)
        assert done.returncode == 0, done.stderr.decode()
        body, _, status = done.stdout.decode().rpartition("\n")
        return int(status), json.loads(body)

    return with_curl if transport == "curl" else with_http_client


# -- processes -----------------------------------------------------------------------

def with_admin(gp):
    wait_listening(gp.admin_port, gp.proc, timeout=15, what="gproxy admin")
    return gp


def listening_at(host, port):
    """True if ``host:port`` (IPv4) is in LISTEN state, per /proc/net/tcp."""
    want = "%s:%04X" % (socket.inet_aton(host)[::-1].hex().upper(), port)
    with open("/proc/net/tcp") as fh:
        return any(f[1] == want and f[3] == "0A"
                   for f in (ln.split() for ln in fh.read().splitlines()[1:]))


class HostBroker(Broker):
    """A mosquitto on a given loopback address and port (127.0.0.2 for the seed)."""

    def __init__(self, directory, name, host, port):
        super().__init__(directory, name)
        self.host, self.port = host, port
        with open(self.conf_path) as fh:
            lines = fh.read().splitlines()
        lines[0] = "listener %d %s" % (port, host)
        with open(self.conf_path, "w") as fh:
            fh.write("\n".join(lines) + "\n")

    def start(self):
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen([MOSQUITTO, "-c", self.conf_path],
                                         stdout=subprocess.DEVNULL, stderr=err)
        if not wait_until(lambda: listening_at(self.host, self.port)
                          or self.proc.poll() is not None, 10):
            self.stop()
            raise RuntimeError("mosquitto %s did not listen on %s" % (self.name, self.addr))
        assert self.proc.poll() is None, "mosquitto %s exited" % self.name
        return self


@pytest.fixture
def seed_brokers(tmp_path):
    """Two brokers on 127.0.0.1:P and 127.0.0.2:P (the seed's chash nodes, port 1995 -> P)."""
    for _ in range(50):
        port = free_port()
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.2", port))
            break
        except OSError:
            continue
    brokers = []
    try:
        for name, host in (("b1", "127.0.0.1"), ("b2", "127.0.0.2")):
            brokers.append(HostBroker(str(tmp_path), name, host, port).start())
        yield brokers[0], brokers[1], port
    finally:
        for broker in brokers:
            broker.stop()


def child_pids(pid):
    """PIDs whose parent is ``pid`` (from /proc/*/stat)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as fh:
                stat = fh.read()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry))
    return sorted(found)


def alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class WorkersGproxy(Gproxy):
    """``python -m gproxy --workers N``; ready when the Admin API listens."""

    workers = 2

    def start(self):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.log_file.path, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gproxy", "-c", self.config_path, "--log-level", "info",
                 "--workers", str(self.workers)],
                cwd=self.dir, env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=err)
        try:
            wait_listening(self.admin_port, self.proc, timeout=20, what="gproxy --workers")
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError("%s; log:\n%s" % (exc, self.log())) from None
        self.worker_pids = child_pids(self.proc.pid)
        return self


@pytest.fixture
def workers_gproxy(tmp_path):
    procs = []

    def make(stream_routes=(), config=None):
        gp = WorkersGproxy(str(tmp_path / "gproxy-workers"), stream_routes, (), config)
        procs.append(gp)
        return gp.start()

    yield make
    for gp in procs:
        gp.stop()
        for pid in getattr(gp, "worker_pids", []):  # they exit on their parent's EOF
            if wait_until(lambda: not alive(pid), 5) is None:
                os.kill(pid, signal.SIGKILL)


# -- MQTT over raw sockets -------------------------------------------------------------

def open_session(port, client_id):
    """CONNECT through gproxy and wait for the broker's CONNACK; the socket stays open."""
    sock = dial(port)
    try:
        sock.sendall(packets.connect_v311(client_id))
        packets.assert_packet(recv_exact(sock, 4), CONNACK_OK, "CONNACK for %r" % client_id)
    except BaseException:
        sock.close()
        raise
    return sock


def try_session(port, client_id):
    """``open_session`` or None if gproxy refused it."""
    try:
        return open_session(port, client_id)
    except (AssertionError, OSError):
        return None


def ping(sock):
    sock.sendall(packets.pingreq())
    packets.assert_packet(recv_exact(sock, 2), PINGRESP, "PINGRESP")


def session_node(gp, client_port, since=0):
    line = gp.wait_for_session_line(client_port, "proxy request to ", since=since)
    return line.split("proxy request to ", 1)[1].split(" ", 1)[0]


def assert_refused(gp, brokers, count=3, prefix="refused"):
    """New connections are closed by gproxy (``not hit any route``); no broker sees them."""
    marks = [b.log.mark() for b in brokers]
    since = gp.mark()
    for i in range(count):
        sock = dial(gp.port)
        try:
            port = local_port(sock)
            try:
                sock.sendall(packets.connect_v311("%s-%d" % (prefix, i)))
            except OSError:
                pass  # already closed by gproxy: that is the point
            expect_closed(sock)
        finally:
            sock.close()
        gp.wait_for_session_line(port, "not hit any route", since=since)
    for broker, mark in zip(brokers, marks):
        assert broker.connections(since=mark) == [], "broker %s got a connection" % broker.name


def mqtt_route_body(*targets, type_="roundrobin", **extra):
    route = mqtt_route([node(t) for t in targets], type_=type_, **extra)
    del route["id"]
    return route


# -- 1. the plugin doc, verbatim ---------------------------------------------------------

@pytest.mark.parametrize("transport", ["http.client", "curl"])
def test_plugin_doc_walkthrough(transport, seed_brokers, gproxy, tmp_path):
    if transport == "curl":
        needs.require(shutil.which("curl") is not None, "needs curl (apt-get install curl)")
    b1, b2, port = seed_brokers
    gp = with_admin(gproxy([]))
    run = seed_runner(transport, gp.admin_port, str(tmp_path))

    # roundrobin route to one real broker: a new key -> 201
    before = int(time.time())
    status, body = run(SEED_PUT_ROUNDROBIN.replace("1980", str(port)))
    assert status == 201, body
    assert body["key"] == "/apisix/stream_routes/1"
    value = body["value"]
    assert value["id"] == "1"
    assert before <= value["create_time"] <= value["update_time"] <= time.time() + 1
    assert value["plugins"] == {"mqtt-proxy": {"protocol_name": "MQTT", "protocol_level": 4}}
    assert value["upstream"] == {"type": "roundrobin",
                                 "nodes": [{"host": "127.0.0.1", "port": port, "weight": 1}]}

    since = gp.mark()
    with Paho("sub-1", gp.port) as sub, Paho("pub-1", gp.port) as pub:
        sub.subscribe("demo")
        pub.publish("demo", b"hello")
        msg = sub.expect_message()
        assert (msg.topic, msg.payload) == ("demo", b"hello")
        for client, cid in ((sub, "sub-1"), (pub, "pub-1")):
            gp.wait_for_session_line(client.local_port, "mqtt client id: %s while prereading client data," % cid, since=since)
            assert session_node(gp, client.local_port, since) == b1.addr
    assert {"sub-1", "pub-1"} <= set(b1.client_ids())

    # chash on the client id over two brokers: the key exists -> 200
    status, body = run(SEED_PUT_CHASH.replace("1995", str(port)))
    assert status == 200, body
    assert body["value"]["upstream"]["type"] == "chash"
    assert body["value"]["create_time"] == value["create_time"]
    ring_nodes = [("127.0.0.1", port, 1), ("127.0.0.2", port, 1)]
    chosen = {b1.addr: [], b2.addr: []}
    for n in range(1, 200):
        cid = "client-%d" % n
        target = chosen[chash_pick(ring_nodes, cid)]
        if len(target) < 3:
            target.append(cid)
        if all(len(v) == 3 for v in chosen.values()):
            break
    assert all(len(v) == 3 for v in chosen.values()), chosen
    by_addr = {b1.addr: b1, b2.addr: b2}
    since = gp.mark()
    for addr, cids in chosen.items():
        other = b2 if addr == b1.addr else b1
        for cid in cids:
            with Paho(cid, gp.port) as client:
                assert session_node(gp, client.local_port, since) == addr, cid
            by_addr[addr].wait_for_client(cid)
            assert cid not in other.client_ids(), "%s reached %s" % (cid, other.addr)

    # DELETE: the exact body; new connections are refused
    status, body = run(SEED_DELETE)
    assert (status, body) == (200, {"deleted": "1", "key": "/apisix/stream_routes/1"})
    assert admin(gp.admin_port, "GET", ADMIN + "/stream_routes/1") == (
        404, {"message": "Key not found"})
    assert_refused(gp, [b1, b2])


# -- 2. live apply --------------------------------------------------------------------------

def roundtrip(client, topic, payload):
    client.publish(topic, payload, qos=1)
    msg = client.expect_message()
    assert (msg.topic, msg.payload) == (topic, payload)


def test_route_change_applies_to_the_next_connection_and_spares_live_sessions(mosquitto,
                                                                                gproxy):
    a, b = mosquitto("a"), mosquitto("b")
    gp = with_admin(gproxy([]))
    route = ADMIN + "/stream_routes/1"
    assert admin(gp.admin_port, "PUT", route, mqtt_route_body(a))[0] == 201

    # every change is in effect for the very next connection (no sleep in between)
    since = gp.mark()
    for i, target in enumerate([b, a, b, a, b]):
        status, _ = admin(gp.admin_port, "PUT", route, mqtt_route_body(target))
        assert status == 200
        sock = open_session(gp.port, "flip-%d" % i)
        try:
            assert session_node(gp, local_port(sock), since) == target.addr, "flip %d" % i
        finally:
            sock.close()

    assert admin(gp.admin_port, "PUT", route, mqtt_route_body(a))[0] == 200
    with Paho("old-client", gp.port) as old:
        old.subscribe("live/old", 1)
        roundtrip(old, "live/old", b"before")
        a.wait_for_client("old-client")

        status, body = admin(gp.admin_port, "PUT", route, mqtt_route_body(b))
        assert status == 200 and body["value"]["upstream"]["nodes"][0]["port"] == b.port
        with Paho("new-client", gp.port) as new:  # right after the 2xx
            b.wait_for_client("new-client")
            assert "new-client" not in a.client_ids()

            a_mark = a.log.mark()
            for i in range(3):  # the old session still relays, to its old broker
                roundtrip(old, "live/old", b"after-%d" % i)
            assert not old.disconnected.is_set()
            assert len(a.log.find("Received PUBLISH from old-client", since=a_mark)) == 3
            assert "old-client" not in b.client_ids()

            status, body = admin(gp.admin_port, "GET", ADMIN + "/gproxy/sessions")
            assert status == 200
            by_port = {s["client_port"]: s for s in body["list"]}
            old_s, new_s = by_port[old.local_port], by_port[new.local_port]
            assert (old_s["route_id"], old_s["node"], old_s["client_id"]) == (
                "1", a.addr, "old-client")
            assert (new_s["route_id"], new_s["node"]) == ("1", b.addr)

            # deleting the route refuses new connections and closes no live session
            assert admin(gp.admin_port, "DELETE", route) == (
                200, {"deleted": "1", "key": "/apisix/stream_routes/1"})
            assert_refused(gp, [a, b], count=2, prefix="after-delete")
            roundtrip(old, "live/old", b"after-delete")
            assert not (old.disconnected.is_set() or new.disconnected.is_set())

            status, body = admin(gp.admin_port, "DELETE",
                                 ADMIN + "/gproxy/sessions?route_id=1")
            assert status == 200  # an eviction of both, all at once
            assert (body["total"], body["selector"]) == (2, {"route_id": "1"})
            assert old.disconnected.wait(5), "the old session was not closed"
            assert new.disconnected.wait(5), "the new session was not closed"
    assert wait_until(lambda: admin(gp.admin_port, "GET", ADMIN + "/gproxy/sessions")[1][
        "total"] == 0, 5)


# -- 3. durability across kill -9 --------------------------------------------------------

class Op:
    def __init__(self, kind, id_, value):
        self.kind, self.id, self.value = kind, id_, value  # value None: a DELETE

    @property
    def key(self):
        return (self.kind, self.id)

    def send(self, port):
        path = "%s/%s/%s" % (ADMIN, self.kind, self.id)
        if self.value is None:
            return admin(port, "DELETE", path, timeout=5)
        return admin(port, "PUT", path, self.value, timeout=5)


class Model:
    """What every acknowledged write says the store holds."""

    def __init__(self):
        self.state = {}   # (kind, id) -> value, or None for deleted
        self.writes = {}  # (kind, id) -> acknowledged writes on that key
        self.acked = 0

    def apply(self, op):
        self.state[op.key] = op.value
        self.writes[op.key] = self.writes.get(op.key, 0) + 1
        self.acked += 1

    def present(self):
        return [k for k, v in self.state.items() if v is not None]


def same(got, want, id_):
    """A stored value matches what was PUT (plus the id and the two timestamps)."""
    if want is None or got is None:
        return want is None and got is None
    return (str(got.get("id")) == id_ and {k: got.get(k) for k in want} == want
            and isinstance(got.get("create_time"), int)
            and isinstance(got.get("update_time"), int))


class Burst(threading.Thread):
    """Admin writes as fast as one client can, until ``count`` or an error."""

    def __init__(self, port, model, rng, tag, count=400):
        super().__init__(daemon=True, name="burst-%s" % tag)
        self.port, self.model, self.rng, self.tag, self.count = port, model, rng, tag, count
        self.acked = []
        self.in_flight = None
        self.refused = []
        self.stopped_by = None

    def next_op(self, i):
        rng = self.rng
        present = self.model.present()
        if present and rng.random() < 0.2:
            kind, id_ = rng.choice(sorted(present))
            return Op(kind, id_, None)
        nodes = [{"host": HOST, "port": 1024 + i, "weight": 1 + i % 5}]
        desc = "%s write %d" % (self.tag, i)
        if rng.random() < 0.5:
            return Op("upstreams", "u%d" % rng.randrange(25),
                      {"type": "roundrobin", "nodes": nodes, "desc": desc})
        value = {"server_port": 1024 + i % 1000, "desc": desc,
                 "upstream": {"type": "roundrobin", "nodes": nodes}}
        if i % 2:
            value["plugins"] = {"mqtt-proxy": {"protocol_name": "MQTT", "protocol_level": 4}}
        return Op("stream_routes", "r%d" % rng.randrange(25), value)

    def run(self):
        for i in range(self.count):
            op = self.next_op(i)
            self.in_flight = op
            try:
                status, body = op.send(self.port)
            except (OSError, http.client.HTTPException) as exc:
                self.stopped_by = exc
                return
            self.in_flight = None
            if 200 <= status < 300:
                self.model.apply(op)
                self.acked.append(op)
            else:
                self.refused.append((op.key, status, body))


def verify_store(gp, model, in_flight):
    """Compare a restarted gproxy (GET) and the file with the model.

    Returns ``(found, missing, in_flight_landed)``; ``found`` counts acknowledged
    writes whose key holds the last acknowledged state.
    """
    with open(gp.routes_path, encoding="utf-8") as fh:
        text = fh.read()
    assert text.rstrip().endswith("#END"), text[-200:]
    doc = yaml.safe_load(text)
    in_file = {(kind, str(v["id"])): v for kind in ("stream_routes", "upstreams")
               for v in doc.get(kind) or []}

    found, missing, landed = 0, [], None
    for key, want in sorted(model.state.items()):
        kind, id_ = key
        status, body = admin(gp.admin_port, "GET", "%s/%s/%s" % (ADMIN, kind, id_))
        assert status in (200, 404), (key, status, body)
        got = body["value"] if status == 200 else None
        ok = same(got, want, id_)
        if not ok and in_flight is not None and in_flight.key == key \
                and same(got, in_flight.value, id_):
            ok, landed = True, True
        if ok:
            found += model.writes.get(key, 0)  # 0: an unacknowledged write that landed
        else:
            missing.append((key, want, got))
        assert same(in_file.get(key), got, id_), "the file and GET disagree on %s" % (key,)
    if in_flight is not None and landed is None:
        landed = False
        if in_flight.key not in model.state:  # a key never acknowledged before
            status, body = admin(gp.admin_port, "GET",
                                 "%s/%s/%s" % (ADMIN, in_flight.kind, in_flight.id))
            landed = status == 200
            if landed:
                assert same(body["value"], in_flight.value, in_flight.id)
    if in_flight is not None and landed:
        model.state[in_flight.key] = in_flight.value  # it is what the store now holds

    # nothing else came back: the listing is exactly the model's present keys
    listed = set()
    for kind in ("stream_routes", "upstreams"):
        status, body = admin(gp.admin_port, "GET", "%s/%s" % (ADMIN, kind))
        assert status == 200 and body["total"] == len(body["list"])
        listed |= {(kind, item["value"]["id"]) for item in body["list"]}
    assert listed == set(model.present()) == set(in_file)
    return found, missing, landed


def test_acknowledged_writes_survive_kill_9(gproxy):
    seed = int(os.environ.get("GPROXY_TEST_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    gp = with_admin(gproxy([]))
    model = Model()
    delays = [0.2, 0.45, 0.7, 0.95]
    rows, total_missing = [], []
    print("\ndurability (seed %d, GPROXY_TEST_SEED to repeat): kill -9 during bursts of "
          "admin writes" % seed)
    print("kill delay_s burst_s acked(del) acked_total found_total missing in_flight "
          "temp_files restart_s")
    for n, delay in enumerate(delays):
        delay += rng.uniform(0, 0.05)
        burst = Burst(gp.admin_port, model, random.Random(rng.random()), "kill%d" % n)
        started = time.monotonic()
        burst.start()
        time.sleep(delay)
        os.kill(gp.proc.pid, signal.SIGKILL)
        assert gp.proc.wait(5) == -signal.SIGKILL
        burst.join(10)
        assert not burst.is_alive()
        elapsed = time.monotonic() - started
        assert burst.refused == [], burst.refused[:3]
        in_flight = burst.in_flight if burst.stopped_by is not None else None
        temp_files = glob.glob(os.path.join(gp.dir, ".apisix.yaml.*"))

        restart = time.monotonic()
        gp.start()
        with_admin(gp)
        restart = time.monotonic() - restart
        found, missing, landed = verify_store(gp, model, in_flight)
        total_missing += missing
        rows.append((n + 1, delay, elapsed, len(burst.acked),
                     sum(op.value is None for op in burst.acked), model.acked, found,
                     len(missing), {None: "-", True: "present", False: "absent"}[landed],
                     len(temp_files), restart))
        print("%4d %7.3f %7.3f %5d(%d) %11d %11d %7d %9s %10d %9.2f" % rows[-1])
        assert len(burst.acked) < burst.count, "the kill came after the burst ended"

    print("totals: writes acknowledged %d, found after restart %d, missing %d"
          % (model.acked, rows[-1][6], len(total_missing)))
    assert total_missing == [], total_missing[:5]
    assert rows[-1][6] == model.acked


# -- 4. hand edits -------------------------------------------------------------------------

BROKEN_EDIT = "stream_routes:\n  - id: 3\n    upstream: {type: roundrobin,\n  nodes: [\n#END\n"


def hand_edit(path, text):
    """Rewrite apisix.yaml in place, as an editor writing over the file would."""
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def edit_text(port0, route1_broker, route2_broker):
    route = """\
  - id: {id}
{match}
    plugins:
      mqtt-proxy:
        protocol_name: "MQTT"
        protocol_level: 4
    upstream:
      type: roundrobin
      nodes:
        "{addr}": 1
"""
    return ("stream_routes:\n"
            + route.format(id=1, match="    server_port: %d" % port0, addr=route1_broker.addr)
            + route.format(id=2, match="    remote_addr: 127.0.0.1", addr=route2_broker.addr)
            + "upstreams: []\n#END\n")


def listed_routes(gp):
    status, body = admin(gp.admin_port, "GET", ADMIN + "/stream_routes")
    assert status == 200
    return {str(item["value"]["id"]): item["value"] for item in body["list"]}


def route_nodes(value):
    nodes = value["upstream"]["nodes"]
    return sorted(nodes) if isinstance(nodes, dict) else sorted(
        "%s:%d" % (n["host"], n["port"]) for n in nodes)


def test_hand_edits_are_picked_up_and_broken_ones_ignored(mosquitto, gproxy):
    a, b = mosquitto("a"), mosquitto("b")
    gp = with_admin(gproxy(lambda ports: [mqtt_route([node(a)], route_id=1, type_="roundrobin",
                                                     server_port=ports[0])], listeners=2))
    p0, p1 = gp.ports

    def node_for(port, cid):
        sock = open_session(port, cid)
        try:
            return session_node(gp, local_port(sock))
        finally:
            sock.close()

    assert node_for(p0, "before-edit") == a.addr
    assert set(listed_routes(gp)) == {"1"}
    since = gp.mark()
    sock = dial(p1)
    try:
        sock.sendall(packets.connect_v311("before-edit-p1"))
        expect_closed(sock)
        gp.wait_for_session_line(local_port(sock), "not hit any route", since=since)
    finally:
        sock.close()

    # a good edit: route 2 (remote_addr only) catches the second listener
    hand_edit(gp.routes_path, edit_text(p0, a, b))
    t0 = time.monotonic()
    assert wait_until(lambda: "2" in listed_routes(gp), 3.0), gp.log()[-3000:]
    picked = time.monotonic() - t0
    assert node_for(p1, "edit1-p1") == b.addr
    assert node_for(p0, "edit1-p0") == a.addr
    print("\nhand edit picked up after %.2fs" % picked)

    # a broken edit: logged, ignored; the old routes keep serving
    since = gp.mark()
    hand_edit(gp.routes_path, BROKEN_EDIT)
    line = gp.wait_for_log("ignoring edit", timeout=3.0, since=since)
    assert "[error]" in line and "apisix.yaml" in line
    assert gp.proc.poll() is None
    routes = listed_routes(gp)
    assert set(routes) == {"1", "2"} and route_nodes(routes["2"]) == [b.addr]
    assert node_for(p1, "broken-p1") == b.addr
    assert node_for(p0, "broken-p0") == a.addr

    # a good edit again: both routes swap brokers
    hand_edit(gp.routes_path, edit_text(p0, b, a))
    assert wait_until(lambda: route_nodes(listed_routes(gp)["2"]) == [a.addr], 3.0), \
        gp.log()[-3000:]
    assert node_for(p1, "edit2-p1") == a.addr
    assert node_for(p0, "edit2-p0") == b.addr


# -- 5. the default key on a non-loopback admin address -------------------------------------

def write_config(directory, admin_ip, key=KEY):
    os.makedirs(directory, exist_ok=True)
    stream_port, admin_port = free_port(), free_port()
    cfg = {"apisix": {"stream_proxy": {"tcp": ["127.0.0.1:%d" % stream_port]}},
           "deployment": {"admin": {"admin_listen": {"ip": admin_ip, "port": admin_port},
                                    "admin_key": [{"name": "admin", "key": key,
                                                   "role": "admin"}]}}}
    path = os.path.join(directory, "config.yaml")
    with open(path, "w") as fh:
        yaml.safe_dump(cfg, fh)
    return path, stream_port, admin_port


def run_gproxy(*args, timeout=30):
    return subprocess.run([sys.executable, "-m", "gproxy", *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("admin_ip", ["0.0.0.0", "::"])
def test_default_key_on_a_public_admin_address_is_refused(tmp_path, admin_ip):
    path, stream_port, admin_port = write_config(str(tmp_path), admin_ip)
    checked = run_gproxy("-c", path, "--check")
    assert checked.returncode == 2, checked
    if admin_ip != "0.0.0.0":
        return
    # --check refused it, so a real start cannot get as far as listening either
    done = run_gproxy("-c", path)
    assert done.returncode == 2, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "admin_key" in lines[0], done.stderr
    assert "listening" not in done.stderr
    assert not os.path.exists(os.path.join(str(tmp_path), "apisix.yaml"))
    assert not listening_at("127.0.0.1", stream_port)


def test_own_key_on_a_public_admin_address_passes_the_check_and_works(tmp_path):
    own = "3e1c0b2f9d5a47e8b6c4a1f0d2e3b4c5"
    path, _, _ = write_config(str(tmp_path / "public"), "0.0.0.0", own)
    checked = run_gproxy("-c", path, "--check")
    assert checked.returncode == 0, checked
    assert "valid" in checked.stdout

    # actually started on loopback only: the own key works, the default one does not
    path, stream_port, admin_port = write_config(str(tmp_path / "local"), "127.0.0.1", own)
    log = open(str(tmp_path / "local" / "gproxy.log"), "wb")
    proc = subprocess.Popen([sys.executable, "-m", "gproxy", "-c", path], stdout=log,
                            stderr=log, stdin=subprocess.DEVNULL)
    try:
        wait_listening(admin_port, proc, what="gproxy")
        assert admin(admin_port, "GET", ADMIN + "/stream_routes", key=own) == (
            200, {"list": [], "total": 0})
        assert admin(admin_port, "GET", ADMIN + "/stream_routes") == (
            401, {"error_msg": "failed to check token", "description": "wrong apikey"})
    finally:
        stop_process(proc)
        log.close()


# -- 6. --workers 2 ----------------------------------------------------------------------------

def live_sessions(gp):
    status, body = admin(gp.admin_port, "GET", ADMIN + "/gproxy/sessions")
    assert status == 200 and body["total"] == len(body["list"])
    return body["list"]


def spread(gp, prefix, first, limit=40):
    """Open ``first`` sessions, then more (up to ``limit``) until both workers hold some.

    SO_REUSEPORT hashes each new connection to a worker, so a handful may all land on
    one.  Returns ``({client_port: sock}, {worker_pid: [session, ...]})``.
    """
    socks = {}

    def by_pid():
        out = {}
        for s in live_sessions(gp):
            if s["client_port"] in socks:
                out.setdefault(int(s["id"].split("-")[0]), []).append(s)
        return out

    try:
        for i in range(first):
            sock = open_session(gp.port, "%s-%d" % (prefix, i))
            socks[local_port(sock)] = sock
        seen = by_pid()
        while len(seen) < 2 and len(socks) < limit:
            sock = open_session(gp.port, "%s-x%d" % (prefix, len(socks)))
            socks[local_port(sock)] = sock
            seen = by_pid()
    except BaseException:
        for sock in socks.values():
            sock.close()
        raise
    assert sum(map(len, seen.values())) == len(socks)
    return socks, seen


def test_two_workers_apply_routes_before_the_answer_and_share_sessions(mosquitto,
                                                                       workers_gproxy):
    helped = run_gproxy("--help")
    assert helped.returncode == 0 and "--workers" in helped.stdout
    a, b = mosquitto("a"), mosquitto("b")
    gp = workers_gproxy()
    assert len(gp.worker_pids) == 2, gp.worker_pids
    route = ADMIN + "/stream_routes/1"
    socks = {}
    try:
        # right after the 201 every worker must have the route: 10 clients, all proxied
        assert admin(gp.admin_port, "PUT", route, mqtt_route_body(a))[0] == 201
        socks, by_pid = spread(gp, "w", 10)
        for items in by_pid.values():
            for s in items:
                assert s["id"].split("-")[1].isdigit()
                assert (s["node"], s["state"], s["route_id"]) == (a.addr, "relaying", "1")
                a.wait_for_client(s["client_id"])
        assert set(by_pid) == set(gp.worker_pids), (sorted(by_pid), gp.worker_pids)

        # close one session in each worker through the Admin API
        for pid, items in sorted(by_pid.items()):
            victim = items[0]
            status, body = admin(gp.admin_port, "DELETE",
                                 ADMIN + "/gproxy/sessions/" + victim["id"])
            assert (status, body) == (200, {"closed": [victim["id"]]})
            sock = socks.pop(victim["client_port"])
            assert sock.recv(16) == b"", "session %s not closed" % victim["id"]
            sock.close()
            assert victim["id"] not in {s["id"] for s in live_sessions(gp)}
        assert admin(gp.admin_port, "DELETE", ADMIN + "/gproxy/sessions/nope-1") == (
            404, {"message": "Key not found"})
        assert len(live_sessions(gp)) == len(socks)

        # a change is in every worker before the 200; live sessions stay where they are
        assert admin(gp.admin_port, "PUT", route, mqtt_route_body(b))[0] == 200
        fresh, by_pid = spread(gp, "w-b", 10)
        try:
            assert set(by_pid) == set(gp.worker_pids)
            for items in by_pid.values():
                for s in items:
                    assert s["node"] == b.addr
                    b.wait_for_client(s["client_id"])
                    assert s["client_id"] not in a.client_ids()
        finally:
            for sock in fresh.values():
                sock.close()
        for sock in socks.values():
            ping(sock)

        status, body = admin(gp.admin_port, "DELETE", route)
        assert (status, body) == (200, {"deleted": "1", "key": "/apisix/stream_routes/1"})
        assert_refused(gp, [a, b], count=8, prefix="w-gone")
        for sock in socks.values():
            ping(sock)

        # a hand edit reaches both workers too
        hand_edit(gp.routes_path, "stream_routes:\n  - id: hand\n    plugins:\n"
                  "      mqtt-proxy: {protocol_name: MQTT, protocol_level: 4}\n"
                  "    upstream:\n      type: roundrobin\n      nodes:\n"
                  "        \"%s\": 1\nupstreams: []\n#END\n" % a.addr)
        assert wait_until(lambda: "hand" in listed_routes(gp), 3.0), gp.log()[-3000:]
        # the parent lists it first, then pushes it to the workers: no promise of "by the
        # time the listing shows it" for hand edits, only "within a second or two"
        first = wait_until(lambda: try_session(gp.port, "w-hand-first"), 2.0)
        assert first, "no worker serves the hand-edited route; log:\n" + gp.log()[-3000:]
        first.close()
        edited, by_pid = spread(gp, "w-hand", 4)
        try:
            assert set(by_pid) == set(gp.worker_pids)
            assert {s["route_id"] for items in by_pid.values() for s in items} == {"hand"}
        finally:
            for sock in edited.values():
                sock.close()
    finally:
        for sock in socks.values():
            sock.close()


# -- the store across a broken hand edit and a racing Admin write -------------------------

def test_a_broken_store_file_at_startup_exits_2_naming_the_store(tmp_path):
    """A broken hand edit still there at the next start: a message, not a traceback."""
    path, _, _ = write_config(str(tmp_path), "127.0.0.1")
    hand_edit(os.path.join(str(tmp_path), "apisix.yaml"), BROKEN_EDIT)
    done = run_gproxy("-c", path, "--check")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("gproxy: cannot load the store: ")
    assert "apisix.yaml" in done.stderr.splitlines()[0]


def test_an_admin_write_right_after_a_hand_edit_does_not_lose_the_edit(mosquitto, gproxy):
    """The watcher polls only every watch_interval (30 s here): a write in between must
    build on the edited file, not replace it with what gproxy had in memory."""
    a = mosquitto("a")
    gp = with_admin(gproxy([], config={"gproxy": {"store": {"watch_interval": 30}}}))
    hand_edit(gp.routes_path, "stream_routes:\n  - id: hand\n    upstream:\n"
              "      type: roundrobin\n      nodes:\n        \"%s\": 1\n"
              "upstreams: []\n#END\n" % a.addr)
    status, _ = admin(gp.admin_port, "PUT", ADMIN + "/upstreams/1",
                      {"type": "roundrobin", "nodes": [node(a)]})
    assert status == 201
    assert "hand" in listed_routes(gp)
    # the write went to the journal; a second later it is folded into the file,
    # which must then hold the edit and the write
    deadline = time.monotonic() + 10
    while os.path.exists(gp.routes_path + ".journal") and time.monotonic() < deadline:
        time.sleep(0.1)
    with open(gp.routes_path, encoding="utf-8") as fh:
        doc = yaml.safe_load(fh.read())
    assert [str(r["id"]) for r in doc.get("stream_routes") or []] == ["hand"], doc
    assert [str(u["id"]) for u in doc.get("upstreams") or []] == ["1"]
    sock = open_session(gp.port, "after-race")  # and it serves: no match fields, to a
    sock.close()
    a.wait_for_client("after-race")


# -- Admin API over a kept-alive connection -------------------------------------------------

def test_kept_alive_admin_requests_are_not_delayed(gproxy):
    """Headers and body go out in two writes; without TCP_NODELAY Nagle would hold the
    body for the client's delayed ACK, ~40 ms a request (nginx sets tcp_nodelay)."""
    gp = with_admin(gproxy([]))
    conn = http.client.HTTPConnection(HOST, gp.admin_port, timeout=10)
    try:
        started = time.monotonic()
        for _ in range(20):
            conn.request("GET", ADMIN + "/stream_routes", headers={"X-API-KEY": KEY})
            resp = conn.getresponse()
            assert resp.status == 200 and json.loads(resp.read())["total"] == 0
        elapsed = time.monotonic() - started
    finally:
        conn.close()
    assert elapsed < 0.4, "20 kept-alive GETs took %.2fs" % elapsed
