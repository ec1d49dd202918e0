"""Latency through an embedded gproxy while its host program computes.

    python -m bench.embedload            # 3 rounds, 20 s a case (~7 minutes)
    python -m bench.embedload --quick    # CI: 1 round, 3 s a case (~1 minute)
    python -m bench.embedload --json out.json --duration 10 --busy 2

A host program (``bench/embedded.py``) embeds gproxy with ``gproxy.start`` in
mode ``thread`` or ``process``, or starts none (``direct``), while it is idle or
runs ``--busy`` CPU-bound Python threads.  A separate client process holds
one MQTT session straight to mosquitto, one through the embedded proxy and one
through the ``gproxy`` command (the same proxy, no host to slow it), and every
``--interval-ms`` (2 ms) sends a PINGREQ on each in turn, waiting for each
PINGRESP: p50/p99/max of those round trips, per path.  Every path sees the
same machine at the same time; rounds interleave the cases.
Also reported per mode: how long ``start`` took, the host's RSS growth, the
child's RSS (process mode), and the median of 200 ``proxy.stats()`` calls.
"""

import argparse
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from bench import configs, mqttwire, procstat
from bench.loadgen import mqtt_session, recv_exact
from bench.ports import HOST, free_port, listening
from bench.embedtable import costs, line, table
from bench.targets import ROOT, Mosquitto, find

MODES = ("thread", "process")
PINGRESP = b"\xd0\x00"


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100.0 * len(ordered)))] if ordered else None


def pinger(pipe, ports, duration, interval, warmup=100):
    """Client process: one session per port; every ``interval`` s a PINGREQ on each,
    one after the other, waiting for each PINGRESP; per port, round trips in µs."""
    try:
        pipe.send(_pings(ports, duration, interval, warmup))
    except Exception as exc:  # reported, raised by the harness
        pipe.send("%s: %s" % (type(exc).__name__, exc))


def _round_trip(sock):
    t = time.perf_counter()
    sock.sendall(mqttwire.PINGREQ)
    if recv_exact(sock, 2) != PINGRESP:
        raise ConnectionError("not a PINGRESP")
    return (time.perf_counter() - t) * 1e6


def _pings(ports, duration, interval, warmup):
    socks = [mqtt_session((HOST, port), b"embedload-%d-%d" % (os.getpid(), i), timeout=30)
             for i, port in enumerate(ports)]
    rtts = [[] for _ in ports]
    try:
        for sock in socks:
            for _ in range(warmup):
                _round_trip(sock)
        start = due = time.perf_counter()
        while due - start < duration:
            for sock, out in zip(socks, rtts):
                while time.perf_counter() < due:
                    time.sleep(max(0.0, due - time.perf_counter() - 0.0002))
                out.append(_round_trip(sock))
                due = max(due + interval / len(socks), time.perf_counter())  # late: no burst
    finally:
        for sock in socks:
            sock.close()
    return rtts


def ping(ports, duration, interval):
    """Round trips (µs) per port, from a fresh client process."""
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=pinger, args=(child, ports, duration, interval), daemon=True)
    proc.start()
    child.close()
    try:
        if not parent.poll(duration * 50 + 60):
            raise RuntimeError("the ping client did not report")
        rtts = parent.recv()
        if isinstance(rtts, str):
            raise RuntimeError("the ping client failed: " + rtts)
        return rtts
    finally:
        proc.join(5)
        if proc.is_alive():
            proc.kill()


def stats(rtts):
    return {"samples": len(rtts), "p50_ms": percentile(rtts, 50) / 1e3,
            "p99_ms": percentile(rtts, 99) / 1e3, "max_ms": max(rtts) / 1e3}


class Proxied:
    """A process on its own gproxy config (one listener, a route to the broker), in a
    directory of its own; started by ``argv(conf)``, stopped by PID."""

    def __init__(self, run_dir, broker_port, name):
        self.dir = tempfile.mkdtemp(dir=run_dir)
        self.port = free_port()
        self.conf = os.path.join(self.dir, "config.yaml")
        with open(self.conf, "w") as fh:
            fh.write(config(self.port))
        with open(os.path.join(self.dir, "apisix.yaml"), "w") as fh:
            fh.write("stream_routes:\n" + configs.gproxy_route(1, self.port, HOST, broker_port)
                     + "#END\n")
        self.log = open(os.path.join(self.dir, name + ".log"), "wb")
        self.proc = None

    def launch(self, argv):
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def terminate(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


class Host(Proxied):
    """One run of ``bench/embedded.py``: started, measured, stopped by PID."""

    def __init__(self, run_dir, broker_port, mode, busy):
        super().__init__(run_dir, broker_port, "host")
        self.mode, self.busy = mode, busy
        self.report_path = os.path.join(self.dir, "report.json")
        self.launch([sys.executable, "-m", "bench.embedded", self.conf, "--mode", mode,
                     "--busy", str(busy), "--report", self.report_path])

    def wait_ready(self, timeout=60):
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.report_path) or not listening(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("host (%s) did not start:\n%s" % (self.mode, self.tail()))
            time.sleep(0.05)
        report = self.report()
        if report.get("child_pid"):
            report["child_rss_kib"] = procstat.rss_kib(report["child_pid"])
        return report

    def report(self):
        with open(self.report_path) as fh:
            return json.load(fh)

    def tail(self):
        self.log.flush()
        with open(self.log.name, "rb") as fh:
            return fh.read()[-3000:].decode("utf-8", "replace")

    def stop(self):
        children = [p for p in procstat.descendants(self.proc.pid) if p != self.proc.pid]
        self.terminate()
        left = [p for p in children if os.path.exists("/proc/%d" % p)]
        report = self.report()
        report["left_behind"] = left  # the embedded child must be gone with its host
        return report


class Command(Proxied):
    """The ``gproxy`` command on the same config: a proxy that no host slows, pinged in
    every run beside the embedded one (the machine's own noise on a two-hop path)."""

    def __init__(self, run_dir, broker_port):
        super().__init__(run_dir, broker_port, "gproxy")
        self.launch([sys.executable, "-m", "gproxy", "-c", self.conf])
        deadline = time.monotonic() + 60
        while not listening(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the gproxy command did not start; see " + self.log.name)
            time.sleep(0.05)

    def stop(self):
        self.terminate()


def config(port):
    """gproxy's config: one listener, no Admin API, control API or metrics listener."""
    return ("apisix:\n  enable_control: false\n  stream_proxy:\n    tcp:\n      - \"%s:%d\"\n"
            "deployment:\n  admin: false\n"
            "plugin_attr:\n  prometheus:\n    enable_export_server: false\n"
            "nginx_config:\n  error_log_level: warn\n"
            "gproxy:\n  store:\n    path: apisix.yaml\n" % (HOST, port))


def measure(run_dir, broker_port, mode, busy, duration, interval, command_port=None):
    """One case: a host embedding gproxy in ``mode`` (``busy`` CPU-bound threads), and a
    client pinging in turn straight to the broker, through the embedded proxy and (with
    ``command_port``) through the gproxy command, so every path sees the same machine
    at the same time; a result dict."""
    host = Host(run_dir, broker_port, mode, busy)
    ports = [broker_port, host.port] + ([command_port] if command_port else [])
    try:
        report = host.wait_ready()
        time.sleep(0.5)  # the busy threads and the proxy settle
        rtts = ping(ports, duration, interval)
    finally:
        final = host.stop()
    result = {"mode": mode, "busy": busy, "direct": stats(rtts[0]), "proxy": stats(rtts[1]),
              "left_behind": final["left_behind"]}
    if command_port:
        result["command"] = stats(rtts[2])
    for key in ("start_s", "host_rss_before_kib", "host_rss_after_kib", "child_rss_kib"):
        if report.get(key) is not None:
            result[key] = report[key]
    if report.get("call_us"):
        result["call_p50_us"] = percentile(report["call_us"], 50)
    if final.get("stop_s") is not None:
        result["stop_s"] = final["stop_s"]
    return result


def run(args):
    """Every case, ``args.rounds`` times, interleaved; the list of results."""
    mosquitto = find("mosquitto")
    if mosquitto is None:
        raise SystemExit("bench.embedload needs mosquitto (apt-get install mosquitto)")
    run_dir = tempfile.mkdtemp(prefix="gproxy-embedload-")
    broker = Mosquitto(run_dir, mosquitto)
    command = None
    results = []
    try:
        broker.start()
        command = Command(run_dir, broker.port)
        for rnd in range(args.rounds):
            for busy in (0, args.busy):
                for mode in args.modes:
                    result = measure(run_dir, broker.port, mode, busy, args.duration,
                                     args.interval_ms / 1e3, command.port)
                    result["round"] = rnd
                    results.append(result)
                    print(line(result), file=sys.stderr, flush=True)
    finally:
        if command is not None:
            command.stop()
        broker.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.embedload", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 round, 3 s a case (CI)")
    parser.add_argument("--rounds", type=int, help="rounds over every case (default 3)")
    parser.add_argument("--duration", type=float, help="seconds of pings a case (default 20)")
    parser.add_argument("--interval-ms", type=float, default=2.0, help="between PINGREQs")
    parser.add_argument("--busy", type=int, default=2, help="CPU-bound host threads (2)")
    parser.add_argument("--modes", default=",".join(MODES), help="thread,process")
    parser.add_argument("--json", metavar="FILE", help="also write every result here")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.duration = args.duration or (3.0 if args.quick else 20.0)
    args.modes = [m for m in args.modes.split(",") if m]
    results = run(args)
    left = [r for r in results if r["left_behind"]]
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "results": results}, fh, indent=1)
    print(table(results, args.busy))
    print()
    print(costs(results))
    if left:
        print("processes left behind by their host: %s" % left, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
