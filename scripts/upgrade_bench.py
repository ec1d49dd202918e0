#!/usr/bin/env python3
"""A live upgrade under 5,000 live sessions, against a plain restart.

    .venv/bin/python scripts/upgrade_bench.py                # 5,000 sessions, one process
    .venv/bin/python scripts/upgrade_bench.py --workers 2    # the same with --workers 2
    .venv/bin/python scripts/upgrade_bench.py --short        # 300 sessions, ~30 s (CI)
    .venv/bin/python scripts/upgrade_bench.py --json out.json

Starts mosquitto and gproxy (the real command line) on loopback and opens N
MQTT 3.1.1 sessions through it; every session sends a PINGREQ every
``--period`` seconds and times the PINGRESP (scripts/upgrade_fleet.py).  Then:

1. **Live upgrade**: ``kill -USR2``.  Reported: each session's longest round
   trip among the pings sent from the signal until the old process exited
   (p50/p99/max over sessions: the pause a session saw; a session is frozen
   from its export to the commit, so its pause is at most the handover and
   at least that minus the ping period), the same before the signal for
   comparison, how many sessions were closed (must be 0), the handover as
   gproxy logs it and until the old process exited, and the RSS and CPU
   seconds of the old and the new process (workers included) sampled every
   20 ms.
2. **Plain restart** of the same fleet, as ``systemctl restart`` does it:
   SIGTERM (every session ends: a DISCONNECT at a packet boundary), wait for
   the exit, start gproxy again; every client reconnects at once and retries
   every 0.1 s.  Reported: sessions ended, and the time from the signal until
   every client had its CONNACK again.

Figures from a shared machine are noisy (say so when you quote them); the CPU
seconds come from /proc and hold up better.  Needs mosquitto (/usr/sbin).
"""

import argparse
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scale_setup import HOST, ROOT, free_port, start_broker, stop, wait_port  # noqa: E402
from upgrade_fleet import Fleet, pauses  # noqa: E402

sys.path.insert(0, ROOT)
from bench.procstat import children, gone, tree_cpu_seconds, tree_rss_kib  # noqa: E402


def pct(values, q):
    return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0


def start_gproxy(workdir, broker, workers):
    stream, admin = free_port(), free_port()
    route = {"id": "fleet", "plugins": {"mqtt-proxy": {"protocol_name": "MQTT",
                                                        "protocol_level": 4}},
             "upstream": {"type": "chash", "key": "mqtt_client_id",
                          "nodes": [{"host": HOST, "port": broker, "weight": 1}]}}
    with open(os.path.join(workdir, "apisix.yaml"), "w") as fh:
        fh.write("stream_routes:\n  - %s\nupstreams: []\n#END\n" % json.dumps(route))
    config = os.path.join(workdir, "config.yaml")
    with open(config, "w") as fh:
        json.dump({"apisix": {"stream_proxy": {"tcp": ["%s:%d" % (HOST, stream)]},
                              "enable_control": False},
                   "plugin_attr": {"prometheus": {"enable_export_server": False}},
                   "deployment": {"admin": {"admin_listen": {"ip": HOST, "port": admin}}},
                   "gproxy": {"max_connections": 20000, "shutdown": {"grace": 5}}}, fh)
    return config, stream


def launch(workdir, config, stream, workers):
    with open(os.path.join(workdir, "gproxy.log"), "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "gproxy", "-c", config, "--workers",
                                 str(workers), "--log-level", "warn"], cwd=ROOT, stdout=log,
                                stderr=log)
    try:
        wait_port(stream, proc, timeout=60)
    except RuntimeError as exc:  # (a port another job took meanwhile: the log says)
        stop(proc)
        raise RuntimeError("gproxy did not start (%s):\n%s" % (exc, log_text(workdir)[-3000:]))
    return proc


def log_text(workdir):
    with open(os.path.join(workdir, "gproxy.log"), errors="replace") as fh:
        return fh.read()


class Sampler(threading.Thread):
    """RSS (KiB) and CPU seconds of the old and the new gproxy, every 20 ms."""

    def __init__(self, old):
        super().__init__(daemon=True)
        self.old, self.new = old, None
        self.samples = []  # (t, old rss, new rss, old cpu, new cpu)
        self.done = threading.Event()

    def run(self):
        while not self.done.is_set():
            if self.new is None:
                self.new = _child(self.old)
            # the new process starts as the old one's child: keep its tree apart
            new_rss = tree_rss_kib(self.new) if self.new else 0
            new_cpu = tree_cpu_seconds(self.new) if self.new else 0.0
            old_rss, old_cpu = tree_rss_kib(self.old), tree_cpu_seconds(self.old)
            if old_rss:
                old_rss, old_cpu = old_rss - new_rss, old_cpu - new_cpu
            self.samples.append((time.monotonic(), old_rss, new_rss, old_cpu, new_cpu))
            time.sleep(0.02)


def _child(pid):
    """The new gproxy: the child of the old one that is not one of its workers."""
    new = [kid for kid in children(pid) if kid not in _WORKERS.get(pid, ())]
    return new[0] if new else None


_WORKERS = {}  # old pid -> its workers' pids, taken before the signal


def upgrade(workdir, proc, fleet, period):
    sampler = Sampler(proc.pid)
    _WORKERS[proc.pid] = set(children(proc.pid))
    sampler.start()
    time.sleep(0.2)
    mark = len(log_text(workdir))
    signalled = time.monotonic()
    proc.send_signal(signal.SIGUSR2)
    fleet.run(120, period, until=lambda: proc.poll() is not None)
    exited = time.monotonic()
    fleet.run(2.0, period)  # the answers still owed, and traffic through the new one
    sampler.done.set()
    sampler.join()
    text = log_text(workdir)[mark:]
    handed = re.search(r"handed (\d+) sessions to pid (\d+) in ([\d.]+)s", text)
    if not handed:
        raise RuntimeError("the upgrade did not hand over:\n" + text[-3000:])
    paused = max(re.findall(r"sessions paused for ([\d.]+)s at most \(exported in ([\d.]+)s, "
                            r"adopted ([\d.]+)s later", text), default=None,
                 key=lambda found: float(found[0]))  # (with --workers: the slowest worker)
    seen = pauses(fleet.pings, signalled, exited)
    before = pauses(fleet.pings, signalled - 5.0, signalled - period)
    return {
        "sessions": len(fleet.sessions), "moved": int(handed.group(1)),
        "closed": sum(1 for s in fleet.sessions if s.closed is not None),
        "handover_s (gproxy's log)": float(handed.group(3)),
        "signal_to_old_exit_s": round(exited - signalled, 3),
        "longest_pause_s (gproxy's log)": float(paused[0]) if paused else None,
        "exported_s, adopted_s (gproxy's log)": paused and [float(paused[1]),
                                                            float(paused[2])],
        "pause_ms": _dist(seen), "pause_before_ms": _dist(before),
        "sessions_pinged_during": len(seen),
        "memory_kib": _memory(sampler.samples, signalled),
        "cpu_s": _cpu(sampler.samples),
    }, int(handed.group(2))


def _dist(values):
    ms = [v * 1000 for v in values]
    return {"p50": round(pct(ms, 0.5), 1), "p99": round(pct(ms, 0.99), 1),
            "max": round(ms[-1], 1) if ms else 0.0}


def _memory(samples, signalled):
    before = [s for s in samples if s[0] < signalled] or samples[:1]
    return {"old_before": before[-1][1], "old_peak": max(s[1] for s in samples),
            "new_peak": max(s[2] for s in samples),
            "both_peak": max(s[1] + s[2] for s in samples)}


def _cpu(samples):
    old = [s[3] for s in samples if s[3]]
    new = [s[4] for s in samples if s[4]]
    # (max: the old tree's total drops as its workers exit and leave it)
    return {"old_during": round(max(old) - old[0], 3) if old else 0.0,
            "new_until_old_exit": round(new[-1], 3) if new else 0.0}


def restart(workdir, pid, config, stream, workers, fleet, period):
    """SIGTERM the running gproxy, start it again; clients reconnect at once."""
    signalled = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    fleet.run(60, period, reconnect=True, until=lambda: gone(pid))
    proc = launch(workdir, config, stream, workers)
    started = time.monotonic()
    fleet.run(120, period, reconnect=True, until=lambda: fleet.all_up)
    back = time.monotonic()
    ended = sum(1 for s in fleet.sessions if s.closed is not None and s.closed >= signalled)
    return {"sessions_ended": ended, "signal_to_all_back_s": round(back - signalled, 3),
            "down_s (signal to new process listening)": round(started - signalled, 3),
            "all_back": fleet.all_up}, proc


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--period", type=float, default=1.0,
                        help="seconds between two pings of one session")
    parser.add_argument("--short", action="store_true", help="300 sessions (CI)")
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()
    if args.short:
        args.sessions = min(args.sessions, 300)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    workdir = tempfile.mkdtemp(prefix="gproxy-upgrade-bench-")
    broker = proc = fleet = None
    new_pid = None
    try:
        broker, broker_port = start_broker(workdir, "broker")
        for attempt in range(3):  # free ports are picked, then bound: another job may win
            config, stream = start_gproxy(workdir, broker_port, args.workers)
            try:
                proc = launch(workdir, config, stream, args.workers)
                break
            except RuntimeError as exc:
                if attempt == 2 or "cannot listen" not in str(exc):
                    raise
        fleet = Fleet(stream, args.sessions)
        fleet.run(3.0, args.period)  # every session pings before the upgrade
        live, new_pid = upgrade(workdir, proc, fleet, args.period)
        plain, proc = restart(workdir, new_pid, config, stream, args.workers, fleet,
                              args.period)
        new_pid = None
        out = {"sessions": args.sessions, "workers": args.workers, "period_s": args.period,
               "live_upgrade": live, "plain_restart": plain}
        print(json.dumps(out, indent=2))
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(out, fh, indent=2)
        if live["closed"] or live["moved"] < args.sessions or not plain["all_back"]:
            print("FAILED: the live upgrade closed sessions or left some behind",
                  file=sys.stderr)
            return 1
        return 0
    finally:
        if fleet is not None:
            fleet.close()
        if new_pid is not None and not gone(new_pid):
            os.kill(new_pid, signal.SIGTERM)
        for p in (proc, broker):
            if p is not None:
                stop(p)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
