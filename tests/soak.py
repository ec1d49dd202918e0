"""Soak and fault test: churn MQTT clients through gproxy while things break.

    python -m tests.soak --short          # ~40 s, what CI runs (tests/integration/test_soak.py)
    python -m tests.soak --duration 300   # the long run, by hand

Loopback only, bounded in time, every process started here stopped by PID.
Two mosquitto brokers (A, B) and a node that drops SYNs (C: a full accept
queue) sit behind one gproxy route (chash on the client id, active TCP health
checks).  While paho clients connect, publish one QoS 1 message each and
disconnect, the fault thread kills broker A and restarts it, rewrites the
route through the Admin API (without touching its checks), and throws in
malformed CONNECTs, CONNECTs dribbled a byte at a time, and a subscriber
that never reads.  Some clients with Wills stay connected the whole run and
are still connected when gproxy gets SIGTERM at the end.

Reported: sessions served and failed; QoS 1 messages lost (PUBACKed by a
broker, never delivered to the subscriber sitting directly on that broker),
apart from the ones the brokers' own logs show a broker lost by itself (see
``broker_losses``: mosquitto runs without persistence, so a kill -9 loses what
it had acknowledged and not yet handed on);
Wills published (every client here ends with a DISCONNECT or gproxy's clean
shutdown, so any Will is a false "device offline"); dials to a node after
the health checker had marked it down; gproxy's fds and RSS at start and
end; and the reconnect time for a client whose node drops SYNs, with health
checks and without.
"""

import argparse
import json
import os
import random
import re
import signal
import socket
import sys
import tempfile
import threading
import time

import paho.mqtt.client as mqtt

from tests import packets
from tests.integration.conftest import HOST, Broker, Gproxy, stop_process
from tests.integration.helpers import ApisixRing, SynDropper

CHECKS = {"active": {"type": "tcp", "timeout": 1,
                     "healthy": {"interval": 1, "successes": 1},
                     "unhealthy": {"interval": 1, "tcp_failures": 1, "timeouts": 1}}}


def proc_fds(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def proc_rss_kib(pid):
    with open("/proc/%d/status" % pid) as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Counts:
    def __init__(self):
        self.lock = threading.Lock()
        self.served = self.failed = 0
        self.acked = {}  # payload -> topic
        self.received = set()
        self.wills = []

    def add(self, **kw):
        with self.lock:
            for key, value in kw.items():
                setattr(self, key, getattr(self, key) + value)


def watcher(broker, counts, name):
    """A client directly on ``broker``: every data message and every Will it publishes."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="soak-watch-" + name,
                         protocol=mqtt.MQTTv311, clean_session=False)
    client.reconnect_delay_set(0.2, 1)

    def on_connect(c, userdata, flags, rc, props):
        c.subscribe([("soak/data/#", 1), ("soak/will/#", 1)])

    def on_message(c, userdata, msg):
        with counts.lock:
            if msg.topic.startswith("soak/will/"):
                counts.wills.append(msg.topic)
            else:
                counts.received.add(msg.payload)

    client.on_connect, client.on_message = on_connect, on_message
    client.connect(HOST, broker.port, keepalive=5)
    client.loop_start()
    return client


#: Sessions a second per churning thread at most: each session costs the load
#: generator's host about four loopback ports (client, upstream, paho's socketpair)
#: that stay in TIME_WAIT for a minute; faster would exhaust the ephemeral ports.
PACE = 10.0


def churn(port, counts, stop, worker):
    n = 0
    while not stop.is_set():
        started = time.monotonic()
        n += 1
        cid = "soak-%d-%d" % (worker, n % 50)  # ids come back, as reconnecting devices do
        payload = ("%d-%d-%f" % (worker, n, time.time())).encode()
        ok = one_session(port, cid, payload, counts)
        counts.add(served=int(ok), failed=int(not ok))
        if not ok:
            time.sleep(0.2)  # a device backs off
        time.sleep(max(0.0, 1.0 / PACE - (time.monotonic() - started)))


def one_session(port, cid, payload, counts):
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid,
                         protocol=mqtt.MQTTv311)
    client.will_set("soak/will/" + cid, b"offline", qos=1)
    client.reconnect_delay_set(30, 30)  # no silent reconnect inside one session
    connected = threading.Event()
    client.on_connect = lambda c, u, f, rc, p: (not rc.is_failure) and connected.set()
    client.connect_async(HOST, port, keepalive=10)
    try:
        client.loop_start()  # it connects: if this fails, no broker knows the client
    except OSError:
        return False
    try:
        if not connected.wait(5):
            return False
        topic = "soak/data/" + cid
        info = client.publish(topic, payload, qos=1)
        info.wait_for_publish(5)
        if not info.is_published():
            return False
        with counts.lock:
            counts.acked[payload] = (topic, time.time())
        client.disconnect()
        return True
    except (OSError, RuntimeError, ValueError):
        return False
    finally:
        client.disconnect()  # a device that gives up still says goodbye: no Will
        client.loop_stop()
        client.socket() and client.socket().close()


def held_clients(port, count):
    """Clients with Wills that stay connected until gproxy shuts down."""
    out = []
    for i in range(count):
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="soak-held-%d" % i,
                             protocol=mqtt.MQTTv5 if i % 2 else mqtt.MQTTv311)
        client.will_set("soak/will/soak-held-%d" % i, b"offline", qos=1)
        client.reconnect_delay_set(60, 60)
        client.connect(HOST, port, keepalive=30)
        client.loop_start()
        out.append(client)
    return out


_LINE = re.compile(r"^(\d+): (.*)$")
_RECEIVED = re.compile(r"Received PUBLISH from (\S+) \(d\d, q1, r\d, m\d+, '(soak/data/[^']*)'")
_SENT = re.compile(r"Sending PUBLISH to (\S+) \(d\d, q1, r\d, m(\d+), '(soak/data/[^']*)'")
_PUBACK = re.compile(r"Received PUBACK from (\S+) \(Mid: (\d+)")


def broker_losses(log_text, watcher):
    """Data messages a broker took but never handed to ``watcher``, read from its log.

    Two kinds, both the broker's own doing (it runs without persistence): a
    message received while ``watcher`` had no confirmed subscription (after a
    restart, before the watcher is back), and a message the watcher had not
    acknowledged when the broker was killed (a "starting" line follows).
    Returns ``(topic, unix second)`` pairs; a QoS 1 message the soak counts as
    lost is the broker's loss only if one of these matches it.
    """
    out, pending, mids, subscribed = [], {}, {}, False
    for line in log_text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        stamp, text = int(m.group(1)), m.group(2)
        if text.startswith("mosquitto version") and text.endswith(" starting"):
            out += [(topic, t) for topic, stamps in pending.items() for t in stamps]
            pending, mids, subscribed = {}, {}, False
        elif text == "Sending SUBACK to " + watcher:
            subscribed = True
        elif received := _RECEIVED.match(text):
            if subscribed:
                pending.setdefault(received.group(2), []).append(stamp)
            else:
                out.append((received.group(2), stamp))
        elif (sent := _SENT.match(text)) and sent.group(1) == watcher:
            mids[sent.group(2)] = sent.group(3)
        elif (puback := _PUBACK.match(text)) and puback.group(1) == watcher:
            stamps = pending.get(mids.pop(puback.group(2), None))
            if stamps:
                stamps.pop(0)
    return out


def split_losses(lost, broker_side):
    """``lost`` (payload -> (topic, acked at)) split into (gproxy's, the brokers')."""
    ours, theirs = [], []
    for payload, (topic, acked) in sorted(lost.items()):
        brokers = any(t == topic and abs(stamp - acked) <= 2 for t, stamp in broker_side)
        (theirs if brokers else ours).append((payload.decode(), topic, round(acked, 3)))
    return ours, theirs


def malformed(port):
    for data in (b"GET / HTTP/1.1\r\n\r\n", b"\x10\xff\xff\xff\xff\x7f",
                 packets.connect(b"x", level=4, protocol_name="MQTX"), b"\x30\x00"):
        try:
            with socket.create_connection((HOST, port), timeout=2) as s:
                s.sendall(data)
                s.recv(16)
        except OSError:
            pass


def dribble(port):
    """A CONNECT one byte at a time, then a clean DISCONNECT."""
    try:
        with socket.create_connection((HOST, port), timeout=5) as s:
            for b in packets.connect_v311("soak-slow-%d" % random.randrange(1000)):
                s.sendall(bytes((b,)))
                time.sleep(0.02)
            if s.recv(4)[:1] == b"\x20":
                s.sendall(packets.disconnect())
    except OSError:
        pass


def non_reader(port):
    """Subscribes to everything through gproxy and never reads again (back-pressure)."""
    s = socket.create_connection((HOST, port), timeout=5)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.sendall(packets.connect_v311("soak-nonreader"))
    topic = b"soak/data/#"
    s.sendall(b"\x82" + bytes((5 + len(topic),)) + b"\x00\x01" + len(topic).to_bytes(2, "big")
              + topic + b"\x00")
    return s


class HealthLog:
    """Polls the control API; keeps, per node, the connect failures counted while down."""

    def __init__(self, gp):
        self.gp = gp
        self.down_since = {}  # node -> failures at the moment it was marked down
        self.after_down = {}  # node -> failures counted while marked down
        self.marks = []

    def failures(self, node):
        m = self.gp.metrics()
        return sum(v for (name, labels), v in m.items()
                   if name == "gproxy_upstream_connect_failures_total"
                   and dict(labels).get("node") == node)

    def poll(self):
        try:
            _, checkers = self.gp.healthcheck()
        except (OSError, ValueError):
            return
        for checker in checkers:
            for n in checker["nodes"]:
                node = "%s:%d" % (n["ip"], n["port"])
                down = n["status"] == "unhealthy"
                if down and node not in self.down_since:
                    self.down_since[node] = self.failures(node)
                    self.marks.append((round(time.monotonic(), 1), node, "down"))
                elif not down and n["status"] == "healthy" and node in self.down_since:
                    self._close(node)
                    self.marks.append((round(time.monotonic(), 1), node, "up"))

    def _close(self, node):
        self.after_down[node] = (self.after_down.get(node, 0)
                                 + self.failures(node) - self.down_since.pop(node))

    def finish(self):
        for node in list(self.down_since):
            self._close(node)
        return self.after_down


def reconnect_times(gp, port, cids, samples):
    out = []
    for cid in cids[:samples]:
        started = time.monotonic()
        try:
            with socket.create_connection((HOST, port), timeout=10) as s:
                s.sendall(packets.connect_v311(cid))
                ok = s.recv(4)[:1] == b"\x20"
                s.sendall(packets.disconnect())
        except OSError:
            ok = False
        out.append(round(time.monotonic() - started, 3) if ok else None)
    return out


def run(duration=20.0, workers=6, held=6, samples=2, workdir=None):
    """Run the soak; returns the report dict."""
    workdir = workdir or tempfile.mkdtemp(prefix="gproxy-soak-")
    a, b = Broker(workdir, "a").start(), Broker(workdir, "b").start()
    c = SynDropper()
    nodes = [{"host": HOST, "port": t.port, "weight": 1} for t in (a, b, c)]
    checked = {"id": 1, "server_port": None, "plugins": {"mqtt-proxy": {"protocol_level": 4}},
               "upstream": {"type": "chash", "key": "mqtt_client_id", "nodes": nodes,
                            "checks": CHECKS, "timeout": {"connect": 1.5, "send": 60,
                                                          "read": 60}}}
    unchecked = json.loads(json.dumps(checked))
    unchecked["id"] = 2
    del unchecked["upstream"]["checks"]

    def routes(ports):
        checked["server_port"], unchecked["server_port"] = ports
        return [checked, unchecked]

    gp = Gproxy(os.path.join(workdir, "gproxy"), routes, listeners=2,
                log_level=os.environ.get("SOAK_LOG_LEVEL", "warn"),
                config={"gproxy": {"shutdown": {"grace": 5}, "preread": {"timeout": 3}}})
    gp.start()
    counts, stop = Counts(), threading.Event()
    threads, clients = [], []
    report = {"duration_s": duration}
    try:
        health = HealthLog(gp)
        deadline = time.monotonic() + 15
        while c.addr not in health.down_since and time.monotonic() < deadline:
            health.poll()
            time.sleep(0.2)
        ring = ApisixRing([(HOST, t.port, 1) for t in (a, b, c)])
        on_c = [cid for cid in ("soak-rc-%d" % i for i in range(300)) if ring.pick(cid) == c.addr]
        report["reconnect_s_syn_dropping_node"] = {
            "with_checks": reconnect_times(gp, gp.ports[0], on_c, samples),
            "without_checks": reconnect_times(gp, gp.ports[1], on_c, samples)}
        for node in health.down_since:  # the unchecked route's dials above don't count
            health.down_since[node] = health.failures(node)
        time.sleep(1.0)
        report["fds_start"], report["rss_kib_start"] = proc_fds(gp.proc.pid), proc_rss_kib(
            gp.proc.pid)
        clients += [watcher(a, counts, "a"), watcher(b, counts, "b")]
        clients += held_clients(gp.ports[0], held)
        slow_sub = non_reader(gp.ports[0])
        for w in range(workers):
            t = threading.Thread(target=churn, args=(gp.ports[0], counts, stop, w), daemon=True)
            t.start()
            threads.append(t)
        report["events"] = faults(gp, a, checked, health, duration)
        stop.set()
        for t in threads:
            t.join(15)
        time.sleep(2.0)  # deliveries in flight
        report["fds_end"], report["rss_kib_end"] = proc_fds(gp.proc.pid), proc_rss_kib(
            gp.proc.pid)
        stats = gp.admin("GET", "/gproxy/stats")[1]
        after_down = health.finish()
        gp.proc.send_signal(signal.SIGTERM)  # the held clients must get clean ends too
        report["exit_code"] = gp.proc.wait(20)
        time.sleep(1.5)  # any Will would be published by now
        slow_sub.close()
        with counts.lock:
            lost, broker_lost = split_losses(
                {p: v for p, v in counts.acked.items() if p not in counts.received},
                broker_losses(a.log.text(), "soak-watch-a")
                + broker_losses(b.log.text(), "soak-watch-b"))
            report.update(
                sessions_served=counts.served, sessions_failed=counts.failed,
                qos1_acked=len(counts.acked), qos1_lost=len(lost), lost=lost[:10],
                qos1_lost_by_brokers=len(broker_lost), lost_by_brokers=broker_lost[:10],
                wills_published=len(counts.wills), wills=sorted(set(counts.wills))[:10],
                dial_failures_after_marked_down=after_down,
                health_marks=health.marks, rejected=stats.get("rejected"),
                tracebacks=gp.log().count("Traceback (most recent call last)"))
    finally:
        stop.set()
        for client in clients:
            client.loop_stop()
            client.socket() and client.socket().close()
        if gp.proc is not None and gp.proc.poll() is None:
            stop_process(gp.proc)
        a.stop()
        b.stop()
        c.close()
    report["workdir"] = workdir
    return report


def faults(gp, a, route, health, duration):
    """Break things on a schedule for ``duration`` seconds; returns what was done."""
    events = []
    start = time.monotonic()
    kill_at, restart_at = duration * 0.25, duration * 0.55
    killed = restarted = False
    next_rewrite = next_junk = 0.0
    rev = 0
    while True:
        now = time.monotonic() - start
        if now >= duration:
            return events
        health.poll()
        if not killed and now >= kill_at:
            a.proc.kill()  # a crash, not a clean stop
            a.proc.wait()
            killed = True
            events.append((round(now, 1), "broker a killed"))
        if killed and not restarted and now >= restart_at:
            a.start()
            restarted = True
            events.append((round(now, 1), "broker a restarted"))
        if now >= next_rewrite:  # a route edit that leaves the checks alone
            rev += 1
            body = dict(route, desc="soak rev %d" % rev)
            body.pop("id")
            code, _ = gp.admin("PUT", "/stream_routes/1", body)
            events.append((round(now, 1), "route rewritten: %d" % code))
            next_rewrite = now + 3.0
        if now >= next_junk:
            threading.Thread(target=malformed, args=(gp.ports[0],), daemon=True).start()
            threading.Thread(target=dribble, args=(gp.ports[0],), daemon=True).start()
            next_junk = now + 1.0
        time.sleep(0.2)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--short", action="store_true", help="the CI mode (~40 s)")
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of churn")
    parser.add_argument("--workers", type=int, default=6, help="churning client threads")
    args = parser.parse_args(argv)
    duration = 20.0 if args.short else args.duration
    report = run(duration, workers=args.workers, samples=2 if args.short else 5)
    json.dump(report, sys.stdout, indent=2, default=str)
    print()
    bad = (report["wills_published"] or report["qos1_lost"] or report["tracebacks"]
           or report["exit_code"] != 0)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
