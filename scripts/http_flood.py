#!/usr/bin/env python3
"""The Admin API under idle and slowloris floods: latency, hub holds, log lines.

    .venv/bin/python scripts/http_flood.py            # 5,000 idle, 2,000 slowloris, ~1 min
    .venv/bin/python scripts/http_flood.py --short    # 1,000 / 300, ~15 s
    .venv/bin/python scripts/http_flood.py --json out.json

Starts gproxy (``python -m gproxy``, its defaults for the HTTP listeners:
``gproxy.admin.max_connections`` 64, ``timeout`` 30 s, ``request_timeout``
10 s) with the hub probe (``GPROXY_HUB_PROBE``), and on loopback measures a
fresh Admin request (``GET /apisix/admin/stream_routes`` on a new connection,
one at a time, 20 ms apart, for ``--seconds`` at least) in four phases:

1. quiet: nothing else;
2. idle: ``--idle`` connections that send nothing, opened once;
3. idle, reconnecting: as many, each reopened as soon as gproxy closes it
   (a connection-rate flood: the client opens connections as fast as it can);
4. slowloris: ``--slow`` connections that send a request line and then a
   header byte every second, reopened when closed.

For each phase it prints the request latency p50/p99/max, requests that
failed, gproxy's CPU seconds, the longest hub hold the probe saw (wall and on
a CPU), and, for the whole run, the most summary lines gproxy wrote in one
second and whether it logged a traceback.  Figures taken on a busy machine
count only roughly; the on-CPU hold and the log counts hold up best.
"""

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.procstat import cpu_seconds  # noqa: E402
from gproxy import hubprobe  # noqa: E402

HOST = "127.0.0.1"
KEY = "flood-script-key-0123456789abcdef"


def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_gproxy(workdir):
    ports = [free_port() for _ in range(4)]
    config = os.path.join(workdir, "config.yaml")
    with open(config, "w") as fh:
        json.dump({"apisix": {"stream_proxy": {"tcp": ["%s:%d" % (HOST, ports[0])]},
                              "control": {"ip": HOST, "port": ports[2]}},
                   "deployment": {"admin": {"admin_listen": {"ip": HOST, "port": ports[1]},
                                            "admin_key": [{"name": "a", "key": KEY,
                                                           "role": "admin"}]}},
                   "plugin_attr": {"prometheus": {"export_addr": {"ip": HOST,
                                                                  "port": ports[3]}}},
                   "nginx_config": {"error_log_level": "warn"}}, fh)  # JSON is YAML
    probe = os.path.join(workdir, "probe.log")
    log = open(os.path.join(workdir, "gproxy.log"), "wb")
    proc = subprocess.Popen([sys.executable, "-m", "gproxy", "-c", config], cwd=ROOT,
                            env=dict(os.environ, GPROXY_HUB_PROBE=probe),
                            stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection((HOST, ports[1]), timeout=1).close()
            return proc, ports[1], probe, log.name
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("gproxy did not listen")


def admin_get(port, timeout=15.0):
    """Seconds for one Admin request on a fresh connection, or None if it failed."""
    started = time.perf_counter()
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as sock:
            sock.sendall(b"GET /apisix/admin/stream_routes HTTP/1.1\r\nHost: x\r\n"
                         b"X-API-KEY: " + KEY.encode() + b"\r\nConnection: close\r\n\r\n")
            data = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        if not data.startswith(b"HTTP/1.1 200"):
            return None
    except OSError:
        return None
    return time.perf_counter() - started


class Flood:
    """``count`` connections to ``port`` (with ``reopen``, reopened when gproxy closes
    one); ``head`` is sent on connect, then ``drip`` every second (slowloris)."""

    def __init__(self, port, count, head=b"", drip=b"", reopen=True):
        self.port, self.count, self.head, self.drip = port, count, head, drip
        self.reopen = reopen
        self.socks, self.opened, self.stop = [], 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _open(self):
        try:
            sock = socket.create_connection((HOST, self.port), timeout=2)
            sock.setblocking(False)
            if self.head:
                sock.send(self.head)
            self.socks.append(sock)
            self.opened += 1
        except OSError:
            pass

    def _run(self):
        next_drip = time.monotonic() + 1.0
        while not self.stop.is_set():
            if len(self.socks) < self.count and (self.reopen or self.opened < self.count):
                for _ in range(min(50, self.count - len(self.socks))):
                    self._open()
            else:
                self.stop.wait(0.05)
            alive = []
            for sock in self.socks:  # drop the ones gproxy closed
                try:
                    if sock.recv(1) == b"":
                        sock.close()
                        continue
                except BlockingIOError:
                    pass
                except OSError:
                    sock.close()
                    continue
                alive.append(sock)
            self.socks = alive
            if self.drip and time.monotonic() >= next_drip:
                next_drip += 1.0
                for sock in self.socks:
                    try:
                        sock.send(self.drip)
                    except OSError:
                        pass

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while self.opened < self.count * 0.9 and time.monotonic() < deadline:
            time.sleep(0.1)
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(10)
        for sock in self.socks:
            sock.close()


def phase(name, port, pid, probe, requests, seconds):
    """``requests`` Admin requests one after another, 20 ms apart, for ``seconds`` at least."""
    cpu, since = cpu_seconds(pid), time.time()
    took, until = [], time.monotonic() + seconds
    while len(took) < requests or time.monotonic() < until:
        took.append(admin_get(port))
        time.sleep(0.02)
    requests = len(took)
    ok = sorted(t * 1000 for t in took if t is not None)
    holds, passes = hubprobe.read(probe, since)
    worst = max(holds, key=lambda h: h[1], default=(0.0, 0.0))
    row = {"phase": name, "requests": requests, "failed": requests - len(ok),
           "p50_ms": ok[len(ok) // 2] if ok else None,
           "p99_ms": ok[min(len(ok) - 1, int(len(ok) * 0.99))] if ok else None,
           "max_ms": ok[-1] if ok else None, "gproxy_cpu_s": cpu_seconds(pid) - cpu,
           "longest_hold_ms": worst[0], "longest_hold_on_cpu_ms": worst[1],
           "gc_passes": len(passes)}
    print("%-13s p50 %6.1f ms  p99 %6.1f ms  max %7.1f ms  failed %d/%d  gproxy CPU %.2f s  "
          "longest hub hold %.1f ms (%.1f ms on a CPU)" % (
              name, row["p50_ms"] or -1, row["p99_ms"] or -1, row["max_ms"] or -1,
              row["failed"], requests, row["gproxy_cpu_s"], worst[0], worst[1]), flush=True)
    return row


def log_figures(path):
    with open(path, errors="replace") as fh:
        text = fh.read()
    stamps = re.findall(r"^(\S+ \S+) \[\w+\] \d+#0: http: closed", text, re.M)
    per_second = max((stamps.count(s) for s in set(stamps)), default=0)
    return {"summary_lines": len(stamps), "most_summary_lines_in_a_second": per_second,
            "tracebacks": text.count("Traceback (most recent call last)"),
            "bytes": len(text)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="a CI-sized run (~20 s)")
    parser.add_argument("--idle", type=int, default=5000)
    parser.add_argument("--slow", type=int, default=2000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=10.0, help="each phase, at least")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.short:
        args.idle, args.slow, args.requests, args.seconds = 1000, 300, 50, 3.0
    workdir = tempfile.mkdtemp(prefix="gproxy-http-flood-")
    proc, port, probe, log = start_gproxy(workdir)
    try:
        run = (port, proc.pid, probe, args.requests, args.seconds)
        rows = [phase("quiet", *run)]
        with Flood(port, args.idle, reopen=False):
            rows.append(phase("idle", *run))
        with Flood(port, args.idle) as idle:
            rows.append(phase("idle, reopen", *run))
        with Flood(port, args.slow, b"GET /apisix/admin/stream_routes HTTP/1.1\r\n",
                   b"X") as slow:
            rows.append(phase("slowloris", *run))
        time.sleep(1.2)  # the last summary line is written a second after its first close
        result = {"phases": rows, "idle_opened": idle.opened, "slow_opened": slow.opened,
                  "log": log_figures(log)}
        print("flood connections opened: idle %d, slowloris %d; log: %s" % (
            idle.opened, slow.opened, result["log"]), flush=True)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(result, fh, indent=1)
        return 0 if not result["log"]["tracebacks"] else 1
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
