#!/usr/bin/env python3
"""Does the control plane stall the data plane?  Hub holds while the tables grow and hostile input arrives.

    bash scripts/control-plane.sh             # full: 5,000 sessions, 10,000 routes + 10,000 upstreams
    bash scripts/control-plane.sh --quick     # 500 sessions, 1,000 + 1,000 (what CI runs)
    .venv/bin/python scripts/control_plane.py --sessions 5000 --objects 10000 --json out.json

Starts two mosquitto brokers and gproxy (file store) with scale_setup.py's hub
probe (a greenlet in gproxy that sleeps 1 ms in a loop and logs each overshoot
above 0.5 ms, with how much of it gproxy spent on a CPU), opens N sessions
that keep relaying (PINGREQs round robin at ``--ping-rate``, each PINGRESP
awaited) and paces new clients (``--connack-rate``), then runs the phases:

1. quiet: nothing else (the baseline);
2. bulk load: ``--objects`` upstreams, then as many routes, through the Admin
   API from ``--clients`` keep-alive connections (writes/s);
3. dashboard polls: what the dashboard asks for once a second (full route and
   upstream lists, a sorted page of sessions, stats, health);
4. SIGHUP, three times; 5. a hand edit of the store file (a reload of all);
6. hostile bodies through the Admin API (scripts/cp_bodies.py): a PEM of
   64 KiB of spaces, IPv6 addresses of colons, huge weights, 1 MiB bodies;
7. the same table and hostile values put straight into etcd, read by a second
   gproxy on the etcd store (Debian's etcd-server) as watch events
   (``--no-etcd`` skips it);
8. idle connections flooding the admin port (``--flood``), then a fresh
   Admin request (answered, or not within 10 s).

For each phase it prints the longest hub hold (wall, and on a CPU), gproxy's
CPU seconds, Admin latency p50/p99, and the p99 of new clients' CONNACK and
of the relaying sessions' PINGREQ round trip, to compare with the quiet
phase.  ``--monitor`` also turns on gevent's monitor thread in gproxy and
lists where the hub was blocked for more than 10 ms.  The probe cannot tell
a busy machine from a busy hub (the on-CPU column is the part gproxy ran):
take figures from a quiet machine.
"""

import argparse
import json
import os
import resource
import signal
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scale_setup import (finish, fleet_route, open_idle, start_broker,  # noqa: E402
                         start_gproxy, stop)
from bench.procstat import cpu_seconds  # noqa: E402  (scale_setup put the repo on the path)
from cp_bodies import hostile, table  # noqa: E402
from cp_load import (Admin, Connacks, EtcdWriter, PingLoad, bulk,  # noqa: E402
                     idle_flood, wait_listed)
import cp_report  # noqa: E402

PROBLEMS = []  # what makes the run fail (exit status 1): gproxy did not do its job


class Target:
    """One gproxy with its probe, sessions, pinger and new-client pacer."""

    def __init__(self, name, proc, stream, admin, probe, sessions, args):
        self.name, self.proc, self.stream, self.admin = name, proc, stream, admin
        self.probe, self.sessions = probe, sessions
        self.ping = PingLoad(sessions, args.ping_rate)
        self.connacks = Connacks(stream, args.connack_rate)
        self.ping.start()
        self.connacks.start()
        self.rows = []

    def phase(self, name, work, **notes):
        """Run ``work()`` (returns Admin latencies or None) and measure around it."""
        self.ping.take()
        self.connacks.take()
        since, cpu = time.time(), cpu_seconds(self.proc.pid)
        latencies = work()
        until = time.time()
        row = cp_report.row(self.name, name, until - since,
                            cp_report.timed_lines(self.probe, since, until),
                            cp_report.timed_lines(self.probe + ".gc", since, until),
                            cpu_seconds(self.proc.pid) - cpu, latencies, self.connacks.take(),
                            self.ping.take(), notes)
        self.rows.append(row)
        print(cp_report.line(row), flush=True)
        return row

    def close(self):
        self.ping.stop()
        self.connacks.stop()
        for sock in self.sessions:
            sock.close()


def file_phases(t, args, brokers, dead, workdir):
    t.phase("quiet", lambda: time.sleep(args.quiet))
    load = {}

    def bulk_load():
        load.update(bulk(t.admin, table(args.objects, brokers), args.clients))
        refused = {s: n for s, n in load["statuses"].items() if s not in (200, 201)}
        if refused:
            PROBLEMS.append("bulk load: answers %s" % refused)
        return load["latencies"]
    t.phase("bulk load", bulk_load, writes=lambda: "%d writes, %.0f/s, statuses %s" % (
        len(load["latencies"]), len(load["latencies"]) / load["seconds"], load["statuses"]))
    t.phase("dashboard polls", lambda: dashboard(t.admin, args.polls))
    t.phase("SIGHUP x3", lambda: sighup(t.proc, 3))
    t.phase("store file hand edit", lambda: hand_edit(t.admin, workdir, args.objects))
    t.phase("hostile bodies (Admin)", lambda: hostile_admin(t.admin, t.stream, brokers[0], dead))


def etcd_phases(args, brokers, dead, workdir, monitor_env):
    from tests.integration.etcd import Etcd  # Debian's etcd-server, as the etcd tests run it
    os.makedirs(os.path.join(workdir, "etcd"))
    etcd = Etcd(os.path.join(workdir, "etcd")).start()
    writer = EtcdWriter(etcd.url)
    writer.put_many([("stream_routes", "fleet", fleet_route(brokers))])
    edir = os.path.join(workdir, "etcd-gproxy")
    os.makedirs(edir)
    deployment = {"role": "traditional", "role_traditional": {"config_provider": "etcd"},
                  "etcd": {"host": [etcd.url]}}
    proc, stream, admin, probe = start_gproxy(edir, brokers, deployment, monitor_env)
    t = Target("etcd", proc, stream, admin, probe, open_idle(stream, args.etcd_sessions), args)
    try:
        t.phase("quiet", lambda: time.sleep(args.quiet))
        items = [(kind, b["id"], b) for _, path, b in table(args.objects, brokers)
                 for kind in [path.split("/")[1]]]
        t.phase("watch: bulk table", lambda: put_and_wait(writer, admin, items, args.objects))
        t.phase("watch: hostile values", lambda: hostile_etcd(writer, brokers[0], dead))
    finally:
        t.close()
        stop(proc)
        etcd.stop()
    return t.rows


def dashboard(port, seconds):
    admin, latencies = Admin(port), []
    paths = ["/stream_routes", "/upstreams", "/gproxy/sessions?page=1&page_size=100&sort=-bytes_in",
             "/gproxy/sessions?page=3&page_size=100&sort=client_id", "/gproxy/stats",
             "/gproxy/health"]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.monotonic()
        for path in paths:
            status, took, _ = admin.call("GET", path)
            latencies.append(took if status == 200 else None)
        time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
    admin.close()
    return latencies


def sighup(proc, times):
    for _ in range(times):
        os.kill(proc.pid, signal.SIGHUP)
        time.sleep(1.5)


def hand_edit(port, workdir, objects):
    path = os.path.join(workdir, "apisix.yaml")
    deadline = time.monotonic() + 30
    while os.path.exists(path + ".journal") and time.monotonic() < deadline:
        time.sleep(0.2)  # folded into the file a second after the last write
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    edit = json.dumps({"id": "hand", "server_port": 19999})
    with open(path + ".edit", "w", encoding="utf-8") as fh:
        fh.write(text.replace("stream_routes:\n", "stream_routes:\n- %s\n" % edit, 1))
    os.replace(path + ".edit", path)
    wait_listed(port, "stream_routes", objects + 2, 60)


def hostile_admin(port, stream, live, dead):
    admin, latencies = Admin(port), []
    for name, kind, id_, text, want in hostile(live, dead):
        status, took, body = admin.call("PUT", "/%s/%s" % (kind, id_), raw=text)
        latencies.append(took)
        print("    %-36s %d in %6.1f ms%s" % (name, status, took * 1000, "" if status == want
                                                else "  (expected %d: %s)" % (want, body[:120])))
        if status != want:
            PROBLEMS.append("%s: %d, expected %d" % (name, status, want))
    status, took, _ = admin.call("PUT", "/stream_routes/rr", {
        "remote_addr": "127.0.0.2", "upstream_id": "w-roundrobin",
        "plugins": {"mqtt-proxy": {"protocol_level": 4}}})
    latencies.append(took)
    print("    %-36s %s" % ("retries past the 1e9-weight node", cp_report.retried(stream)))
    admin.close()
    return latencies


def hostile_etcd(writer, live, dead):
    for name, kind, id_, text, _ in hostile(live, dead):
        writer.put(kind, "etcd-" + id_, text)
    time.sleep(3)  # the watch delivers them; the probe sees what applying them costs


def put_and_wait(writer, admin, items, objects):
    writer.put_many(items)
    took = wait_listed(admin, "stream_routes", objects + 1, 600)
    print("    every watch event applied %s" % ("in %.1f s" % took if took else "NOT within 600 s"))
    if took is None:
        PROBLEMS.append("the etcd store did not apply %d watch events" % len(items))


def flood_phase(t, args):
    socks = []

    def work():
        socks.extend(idle_flood(t.admin, args.flood))
        time.sleep(1)
        admin, latencies = Admin(t.admin, timeout=10), []
        for _ in range(3):
            status, took, _ = admin.call("GET", "/upstreams/u0")
            latencies.append(took if status == 200 else None)
        admin.close()
        return latencies
    try:
        t.phase("admin idle flood", work, flood=lambda: "%d idle connections" % len(socks))
    finally:
        for sock in socks:
            sock.close()


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="500 sessions, 1,000 objects (CI)")
    parser.add_argument("--sessions", type=int, default=5000)
    parser.add_argument("--objects", type=int, default=10000, help="upstreams, and as many routes")
    parser.add_argument("--clients", type=int, default=8, help="parallel Admin connections")
    parser.add_argument("--ping-rate", type=float, default=1000.0)
    parser.add_argument("--connack-rate", type=float, default=50.0)
    parser.add_argument("--quiet", type=float, default=10.0, help="seconds of the quiet phase")
    parser.add_argument("--polls", type=float, default=10.0, help="seconds of dashboard polls")
    parser.add_argument("--flood", type=int, default=2000, help="idle admin connections")
    parser.add_argument("--no-etcd", action="store_true")
    parser.add_argument("--monitor", action="store_true", help="gevent's monitor thread in gproxy")
    parser.add_argument("--json", help="write the figures here too")
    parser.add_argument("--keep", action="store_true", help="keep the work dir and its logs")
    args = parser.parse_args(argv)
    if args.quick:
        args.sessions, args.objects, args.quiet, args.polls = 500, 1000, 4.0, 4.0
        args.flood, args.ping_rate = 300, 300.0
    args.etcd_sessions = max(args.sessions // 5, 100)
    return args


def main(argv=None):
    args = parse(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    workdir = tempfile.mkdtemp(prefix="gproxy-control-plane-")
    monitor = {"GEVENT_MONITOR_THREAD_ENABLE": "true",
               "GEVENT_MAX_BLOCKING_TIME": "0.01"} if args.monitor else {}
    procs, targets = [], []
    started = time.monotonic()
    try:
        brokers = [start_broker(workdir, name) for name in ("a", "b")]
        procs += [p for p, _ in brokers]
        ports = [p for _, p in brokers]
        dead = cp_report.dead_port()
        proc, stream, admin, probe = start_gproxy(workdir, ports, env=monitor)
        procs.append(proc)
        print(cp_report.HEADER % (args.sessions, args.objects), flush=True)
        t = Target("file", proc, stream, admin, probe, open_idle(stream, args.sessions), args)
        targets.append(t)
        file_phases(t, args, ports, dead, workdir)
        flood_phase(t, args)
        rows = list(t.rows)
        if not args.no_etcd:
            rows += etcd_phases(args, ports, dead, workdir, monitor)
        cp_report.summary(rows, time.monotonic() - started)
        if args.monitor:
            cp_report.blocked(os.path.join(workdir, "gproxy.log"))
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"args": vars(args), "rows": rows, "problems": PROBLEMS}, fh,
                          indent=1, default=str)
        if proc.poll() is not None:
            PROBLEMS.append("gproxy exited with status %s" % proc.returncode)
        for problem in PROBLEMS:
            print("FAILED: %s" % problem)
        return 1 if PROBLEMS else 0
    finally:
        for target in targets:
            target.close()
        finish(procs, workdir, args.keep, "gproxy.log, probe.log")


if __name__ == "__main__":
    sys.exit(main())
