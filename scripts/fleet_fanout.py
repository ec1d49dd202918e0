#!/usr/bin/env python3
"""How long does a fleet-wide sessions query take?  3 instances x 3,000 sessions.

    .venv/bin/python scripts/fleet_fanout.py              # full: 3 x 3,000 sessions, 20 of each
    .venv/bin/python scripts/fleet_fanout.py --short      # 3 x 300, 5 of each (run by the tests)
    .venv/bin/python scripts/fleet_fanout.py --instances 3 --sessions 3000 --json out.json

Starts Debian's etcd, two mosquitto brokers and N gproxy instances on one
etcd prefix (loopback), a chash route over both brokers written through the
first instance, and M idle MQTT sessions through each instance.  Then asks
the first instance's Admin API, one request at a time, for the views an
operator uses (this instance's page for comparison; the fleet's first page,
one client id, a deep page, what would move, the instances list) and reports
for each the answer's size and the time to the last byte (median and max),
plus:

* how long each gproxy's hub was held while it answered (a probe greenlet in
  each process, ``scale_setup.py``: the asked instance merges the pages, the
  others each answer one page), wall clock and on a CPU, and Python's full
  garbage collections meanwhile (each holds the hub too);
* the CPU seconds each instance spent in the query phase (from /proc).

The clients, etcd and the three instances share the machine: on a busy one
compare medians, and the on-CPU column of the hub holds.
"""

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scale_setup import (HOST, KEY, ROOT, free_port, gc_passes, open_idle,  # noqa: E402
                         probe_holds, start_broker, stop, wait_port)

from bench.procstat import tree_cpu_seconds  # noqa: E402

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
PREFIX = "/fanout"


def start_etcd(workdir):
    client, peer = free_port(), free_port()
    url, purl = "http://%s:%d" % (HOST, client), "http://%s:%d" % (HOST, peer)
    log = open(os.path.join(workdir, "etcd.log"), "wb")
    proc = subprocess.Popen([ETCD, "--name", "fanout", "--data-dir",
                             os.path.join(workdir, "etcd-data"), "--listen-client-urls", url,
                             "--advertise-client-urls", url, "--listen-peer-urls", purl,
                             "--initial-advertise-peer-urls", purl,
                             "--initial-cluster", "fanout=" + purl], stdout=log, stderr=log)
    wait_port(client, proc)
    return proc, url


def start_instance(workdir, name, etcd_url):
    """One gproxy (with scale_setup's hub probe) on the shared etcd."""
    directory = os.path.join(workdir, name)
    os.makedirs(directory)
    stream, admin = free_port(), free_port()
    config = os.path.join(directory, "config.yaml")
    with open(config, "w") as fh:
        json.dump({"apisix": {"stream_proxy": {"tcp": ["%s:%d" % (HOST, stream)]}, "id": name,
                              "enable_control": False},
                   "plugin_attr": {"prometheus": {"enable_export_server": False}},
                   "deployment": {"role": "traditional",
                                  "role_traditional": {"config_provider": "etcd"},
                                  "etcd": {"host": [etcd_url], "prefix": PREFIX},
                                  "admin": {"admin_listen": {"ip": HOST, "port": admin},
                                            "admin_key": [{"name": "admin", "key": KEY,
                                                           "role": "admin"}]}},
                   "gproxy": {"max_connections": 20000}}, fh)
    probe = os.path.join(directory, "probe.log")
    open(probe, "w").close()
    log = open(os.path.join(directory, "gproxy.log"), "wb")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "scripts", "scale_setup.py"),
                             config, probe], cwd=directory, stdout=log, stderr=log)
    wait_port(admin, proc)
    wait_port(stream, proc)
    return {"name": name, "proc": proc, "stream": stream, "admin": admin, "probe": probe}


def call(admin, method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request("http://%s:%d/apisix/admin%s" % (HOST, admin, path),
                                 data=data, method=method, headers={"X-API-KEY": KEY})
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=60) as resp:
        raw = resp.read()
    return json.loads(raw), len(raw), (time.perf_counter() - start) * 1000


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except OSError:  # urllib's HTTPError too: not there yet
            pass
        time.sleep(0.1)
    raise RuntimeError("timed out waiting for " + what)


def views(sessions, instances):
    """The queries measured, asked of the first instance."""
    other, mine = instances[-1]["name"], instances[0]["name"]
    return {
        "this instance, page of 50": "/gproxy/sessions?page=1&page_size=50",
        "this instance, one client id": "/gproxy/sessions?client_id=%s-%010d&page_size=10"
                                        % (mine, sessions // 2),
        "fleet, page of 50": "/gproxy/sessions?fleet=true&page=1&page_size=50",
        "fleet, one client id": "/gproxy/sessions?fleet=true&client_id=%s-%010d&page_size=10"
                                % (other, sessions // 2),
        "fleet, page 10 of 50": "/gproxy/sessions?fleet=true&page=10&page_size=50",
        "fleet, what would move": "/gproxy/sessions?fleet=true&misplaced=true&page_size=10",
        "instances (stats of each)": "/gproxy/instances",
    }


def measure(args):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    workdir = tempfile.mkdtemp(prefix="gproxy-fanout-")
    procs, socks = [], []
    try:
        etcd, url = start_etcd(workdir)
        procs.append(etcd)
        brokers = [start_broker(workdir, "b%d" % i) for i in range(2)]
        procs += [proc for proc, _ in brokers]
        instances = [start_instance(workdir, "gp%d" % i, url) for i in range(args.instances)]
        procs += [i["proc"] for i in instances]
        first = instances[0]
        route = {"plugins": {"mqtt-proxy": {"protocol_name": "MQTT", "protocol_level": 4}},
                 "upstream": {"type": "chash", "key": "mqtt_client_id", "nodes": [
                     {"host": HOST, "port": port, "weight": 1} for _, port in brokers]}}
        call(first["admin"], "PUT", "/stream_routes/fleet", route)
        wait_for(lambda: call(first["admin"], "GET", "/gproxy/instances")[0]["total"]
                 == args.instances, 30, "every instance registered")
        for inst in instances:
            wait_for(lambda i=inst: call(i["admin"], "GET", "/stream_routes/fleet")[0], 30,
                     "the route on " + inst["name"])
            socks += open_idle(inst["stream"], args.sessions,
                               prefix=(inst["name"] + "-").encode())
        total = args.sessions * args.instances
        wait_for(lambda: call(first["admin"], "GET", "/gproxy/sessions?fleet=true&page_size=10"
                              )[0]["total"] == total, 60, "every session listed")
        result = {"instances": args.instances, "sessions_each": args.sessions,
                  "repeat": args.repeat, "views": {}}
        cpu0 = {i["name"]: tree_cpu_seconds(i["proc"].pid) for i in instances}
        since = time.time()
        for name, path in views(args.sessions, instances).items():
            times, size = [], 0
            for _ in range(args.repeat):
                body, size, ms = call(first["admin"], "GET", path)
                assert not body.get("unreachable"), body["unreachable"]
                times.append(ms)
            result["views"][name] = {"bytes": size, "median_ms": statistics.median(times),
                                     "max_ms": max(times)}
        until = time.time()
        result["cpu_s"] = {i["name"]: round(tree_cpu_seconds(i["proc"].pid) - cpu0[i["name"]], 3)
                           for i in instances}
        result["hub_holds"] = {}
        for inst in instances:
            holds = probe_holds(inst["probe"], since, until)
            full = [ms for gen, ms in gc_passes(inst["probe"], since, until) if gen == 2]
            result["hub_holds"][inst["name"]] = {
                "count_over_1ms": sum(1 for wall, _ in holds if wall >= 1.0),
                "longest_wall_ms": max((w for w, _ in holds), default=0.0),
                "longest_on_cpu_ms": max((r for _, r in holds), default=0.0),
                "full_gc_passes": len(full), "longest_full_gc_ms": max(full, default=0.0)}
        result["load_average"] = os.getloadavg()
        return result
    finally:
        for sock in socks:
            sock.close()
        for proc in reversed(procs):
            stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)


def summary(result):
    lines = ["%d instances x %d sessions (%d repeats each); load average %.1f %.1f %.1f"
             % ((result["instances"], result["sessions_each"], result["repeat"])
                + tuple(result["load_average"])),
             "%-30s %9s %11s %9s" % ("view (asked of gp0)", "bytes", "median ms", "max ms")]
    for name, v in result["views"].items():
        lines.append("%-30s %9d %11.1f %9.1f" % (name, v["bytes"], v["median_ms"], v["max_ms"]))
    lines.append("CPU seconds in the query phase: %s" % ", ".join(
        "%s %.2f" % kv for kv in result["cpu_s"].items()))
    for name, h in result["hub_holds"].items():
        lines.append("%s hub: %d holds >= 1 ms, longest %.1f ms wall / %.1f ms on a CPU; "
                     "%d full GC passes, longest %.1f ms"
                     % (name, h["count_over_1ms"], h["longest_wall_ms"], h["longest_on_cpu_ms"],
                        h["full_gc_passes"], h["longest_full_gc_ms"]))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--short", action="store_true", help="3 x 300 sessions, 5 repeats")
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--sessions", type=int, default=3000, help="idle sessions per instance")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    if args.short:
        args.sessions, args.repeat = 300, 5
    result = measure(args)
    print(summary(result))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
