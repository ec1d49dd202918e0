#!/usr/bin/env python3
"""Does the live-sessions view hold a fleet?  Idle sessions, a dashboard, figures.

    .venv/bin/python scripts/scale.py                 # full: 9,000 idle sessions, 3 rounds
    .venv/bin/python scripts/scale.py --short         # a few hundred, ~40 s (run by the tests)
    .venv/bin/python scripts/scale.py --sessions 5000 --rounds 2 --json out.json

Starts two mosquitto brokers and gproxy (one process, a chash route over both
brokers) on loopback, opens N idle MQTT sessions through it, then measures in
rounds, with and without the Connections page open in Debian's Chromium:

* new clients' CONNECT->CONNACK latency (TCP connect + CONNECT until CONNACK,
  paced, one at a time): p50 / p99 / max;
* how long gproxy's hub was held: a probe greenlet inside the gproxy process
  sleeps 1 ms in a loop and logs every overshoot above 0.5 ms;
* the browser's long tasks (PerformanceObserver 'longtask', > 50 ms each);
* Admin API answers: bytes and time of the page the dashboard asks for, of
  /stats, of "what would move", and of filtered views.

The script's own clients and the browser share the machine with gproxy, so
figures from a busy machine are noisy: compare the two columns of one run.
Needs mosquitto (/usr/sbin), chromium (/usr/bin) and Playwright for Python.
"""

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench import mqttwire  # noqa: E402  (the repo's own MQTT packet builder)

HOST = "127.0.0.1"
KEY = "scale-script-key-0123456789abcdef"
CHROMIUM = "/usr/bin/chromium"
PROBE_MS = 1.0
LONGTASKS = """
window.__longtasks = [];
new PerformanceObserver((list) => {
  for (const e of list.getEntries()) window.__longtasks.push(e.duration);
}).observe({type: "longtask", buffered: true});
"""


# -- the gproxy child, with a hub-latency probe -------------------------------------------

def serve(config, probe_path):
    """``--serve``: gproxy's CLI in this process plus a probe greenlet."""
    from gevent import monkey
    monkey.patch_all()
    import gevent

    def probe():
        with open(probe_path, "a", buffering=1) as fh:
            while True:
                start, cpu = time.perf_counter(), time.process_time()
                gevent.sleep(PROBE_MS / 1000)
                late = (time.perf_counter() - start) * 1000 - PROBE_MS
                if late > 0.5:  # and how much of it this process ran (vs. waited for a core)
                    ran = (time.process_time() - cpu) * 1000
                    fh.write("%.4f %.3f %.3f\n" % (time.time(), late, min(late, ran)))

    gevent.spawn(probe)
    from gproxy import cli
    return cli.main(["-c", config, "--log-level", "error"])


def probe_holds(path, since, until):
    """Hub overshoots logged between two wall-clock times: ``[(wall ms, ran ms)]``.

    ``wall``: how late the probe woke; ``ran``: how much of that the gproxy
    process spent on a CPU (the rest it waited for a core: a busy machine)."""
    out = []
    with open(path) as fh:
        for line in fh:
            at, late, ran = line.split()
            if since <= float(at) <= until:
                out.append((float(late), float(ran)))
    return out


# -- processes ------------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_port(port, proc, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("process exited with %s" % proc.returncode)
        try:
            socket.create_connection((HOST, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("nothing listens on %d" % port)


def start_broker(workdir, name):
    port = free_port()
    conf = os.path.join(workdir, name + ".conf")
    with open(conf, "w") as fh:
        fh.write("listener %d %s\nallow_anonymous true\npersistence false\nlog_type none\n"
                 % (port, HOST))
        if os.geteuid() == 0:
            fh.write("user root\n")
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    proc = subprocess.Popen([mosquitto, "-c", conf], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_port(port, proc)
    return proc, port


def start_gproxy(workdir, brokers):
    stream, admin = free_port(), free_port()
    route = {"id": "fleet", "plugins": {"mqtt-proxy": {"protocol_name": "MQTT",
                                                        "protocol_level": 4}},
             "upstream": {"type": "chash", "key": "mqtt_client_id", "nodes": [
                 {"host": HOST, "port": p, "weight": 1} for p in brokers]}}
    with open(os.path.join(workdir, "apisix.yaml"), "w") as fh:
        fh.write("stream_routes:\n  - %s\nupstreams: []\n#END\n" % json.dumps(route))
    config = os.path.join(workdir, "config.yaml")
    with open(config, "w") as fh:
        json.dump({"apisix": {"stream_proxy": {"tcp": ["%s:%d" % (HOST, stream)]}},
                   "deployment": {"admin": {"admin_listen": {"ip": HOST, "port": admin},
                                            "admin_key": [{"name": "admin", "key": KEY,
                                                           "role": "admin"}]}},
                   "gproxy": {"max_connections": 20000}}, fh)
    probe = os.path.join(workdir, "probe.log")
    open(probe, "w").close()
    log = open(os.path.join(workdir, "gproxy.log"), "wb")
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", config,
                             probe], cwd=workdir, stdout=log, stderr=log)
    try:
        wait_port(admin, proc)
        wait_port(stream, proc)
    except RuntimeError as exc:
        stop(proc)
        with open(log.name, errors="replace") as fh:
            raise RuntimeError("gproxy did not start (%s):\n%s" % (exc, fh.read()[-3000:]))
    return proc, stream, admin, probe


def stop(proc):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# -- clients -----------------------------------------------------------------------------

def open_idle(port, count, batch=250):
    """``count`` idle MQTT sessions through gproxy (no keepalive), CONNACK checked."""
    socks = []
    template = mqttwire.ConnectTemplate(b"idle-")
    while len(socks) < count:
        group = []
        for _ in range(min(batch, count - len(socks))):
            sock = socket.create_connection((HOST, port), timeout=30)
            sock.sendall(template.build(len(socks) + len(group)))
            group.append(sock)
        for sock in group:
            if recv_exact(sock, 4) != mqttwire.CONNACK_OK:
                raise RuntimeError("an idle session was refused")
        socks.extend(group)
    return socks


def recv_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise RuntimeError("closed after %d bytes" % len(buf))
        buf += chunk
    return buf


def connack_latencies(port, seconds, rate, start_id):
    """New clients, one at a time, ``rate`` a second: ms from connect() to CONNACK."""
    template = mqttwire.ConnectTemplate(b"probe-")
    out, n = [], start_id
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        due = t0 + len(out) / rate
        time.sleep(max(0, due - time.monotonic()))
        start = time.perf_counter()
        sock = socket.create_connection((HOST, port), timeout=10)
        try:
            sock.sendall(template.build(n))
            recv_exact(sock, 4)
            out.append((time.perf_counter() - start) * 1000)
            sock.sendall(mqttwire.DISCONNECT)
        finally:
            sock.close()
        n += 1
    return out


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0


# -- the Admin API ----------------------------------------------------------------------

def get(admin, path):
    req = urllib.request.Request("http://%s:%d/apisix/admin%s" % (HOST, admin, path),
                                 headers={"X-API-KEY": KEY})
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=30) as resp:
        body = resp.read()
    return body, (time.perf_counter() - start) * 1000


def admin_figures(admin, repeat):
    views = {
        "dashboard page (50 rows)": "/gproxy/sessions?page=1&page_size=50&sort=connected_at",
        "stats": "/gproxy/stats",
        "what would move": "/gproxy/sessions?misplaced=true&page_size=10",
        "filter client_id": "/gproxy/sessions?client_id=idle-0000000042&page_size=50",
        "filter node, by bytes": "/gproxy/sessions?node=%s&sort=-bytes_in&page_size=50",
        "filter client_addr, page 20": "/gproxy/sessions?client_addr=127.0.0.0/8&page=20"
                                       "&page_size=50",
    }
    node = next(iter(json.loads(get(admin, "/gproxy/stats")[0])["per_node"]), "")
    out = {}
    for name, path in views.items():
        path = path.replace("%s", node)
        times = []
        for _ in range(repeat):
            body, ms = get(admin, path)
            times.append(ms)
        out[name] = {"bytes": len(body), "median_ms": round(statistics.median(times), 2),
                     "max_ms": round(max(times), 2)}
    return out


# -- the browser -------------------------------------------------------------------------

class Dashboard:
    def __init__(self, admin):
        from playwright.sync_api import sync_playwright
        self.base = "http://%s:%d" % (HOST, admin)
        self._pw = sync_playwright().start()
        self.browser = self._pw.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
        self.page = self.browser.new_page(viewport={"width": 1280, "height": 900})
        self.page.add_init_script(LONGTASKS)

    def open(self, sessions):
        self.page.goto(self.base + "/ui/")
        self.page.evaluate("k => sessionStorage.setItem('gproxy.adminKey', k)", KEY)
        self.page.goto(self.base + "/ui/#/connections")
        self.page.reload()
        self.page.wait_for_function(
            "n => document.querySelector('[data-stat=live_sessions]').textContent"
            ".replace(/,/g, '') >= n", arg=sessions, timeout=30000)
        self.page.wait_for_selector("#sessions-table tbody tr", timeout=30000)

    def close(self):
        self.page.goto("about:blank")

    def longtasks(self):
        return self.page.evaluate("window.__longtasks || []")

    def rows(self):
        return self.page.locator("#sessions-table tbody tr").count()

    def quit(self):
        self.browser.close()
        self._pw.stop()


# -- the run ---------------------------------------------------------------------------

def measure(args):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    workdir = tempfile.mkdtemp(prefix="gproxy-scale-")
    procs = []
    socks = []
    dash = None
    try:
        brokers = [start_broker(workdir, name) for name in ("a", "b")]
        procs += [p for p, _ in brokers]
        for attempt in range(3):  # a free port may be taken by someone else meanwhile
            try:
                gp, stream, admin, probe = start_gproxy(workdir, [p for _, p in brokers])
                break
            except RuntimeError:
                if attempt == 2:
                    raise
        procs.append(gp)
        t = time.monotonic()
        socks = open_idle(stream, args.sessions)
        opened = time.monotonic() - t
        print("%d idle sessions open in %.1fs" % (len(socks), opened), flush=True)
        dash = Dashboard(admin)
        rounds = []
        next_id = 0
        for r in range(args.rounds):
            row = {}
            for phase in ("without dashboard", "with dashboard"):
                if phase == "with dashboard":
                    dash.open(args.sessions)
                since = time.time()
                lat = connack_latencies(stream, args.seconds, args.rate, next_id)
                until = time.time()
                next_id += len(lat)
                holds = probe_holds(probe, since, until)
                row[phase] = {"n": len(lat), "p50": pct(lat, .5), "p99": pct(lat, .99),
                              "max": max(lat),
                              "hub_max_ms": max((w for w, _ in holds), default=0.0),
                              "hub_max_cpu_ms": max((c for _, c in holds), default=0.0),
                              "hub_over_5ms": sum(1 for w, _ in holds if w > 5)}
                if phase == "with dashboard":
                    tasks = dash.longtasks()
                    row[phase].update(rows_rendered=dash.rows(), longtasks=len(tasks),
                                      longest_task_ms=max(tasks, default=0.0))
                    dash.close()
                print("round %d %-18s p50 %.2f p99 %.2f max %.2f ms, hub max %.1f ms "
                      "(%.1f ms on a CPU)%s" % (
                          r + 1, phase, row[phase]["p50"], row[phase]["p99"], row[phase]["max"],
                          row[phase]["hub_max_ms"], row[phase]["hub_max_cpu_ms"],
                    ", longest task %.0f ms, %d rows" % (row[phase]["longest_task_ms"],
                                                         row[phase]["rows_rendered"])
                    if "longtasks" in row[phase] else ""), flush=True)
            rounds.append(row)
        api = admin_figures(admin, args.repeat)
        return {"sessions": len(socks), "open_seconds": round(opened, 1),
                "rounds": rounds, "admin": api, "machine_cpus": os.cpu_count()}
    finally:
        if dash is not None:
            dash.quit()
        for sock in socks:
            sock.close()
        for proc in reversed(procs):
            stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)


def summary(result):
    def med(phase, key):
        return statistics.median(r[phase][key] for r in result["rounds"])
    base, dash = "without dashboard", "with dashboard"
    lines = ["%d idle sessions, %d rounds (medians over rounds):" % (
        result["sessions"], len(result["rounds"])),
        "  CONNACK p99 without dashboard %.2f ms, with %.2f ms (rise %.2f ms)" % (
            med(base, "p99"), med(dash, "p99"), med(dash, "p99") - med(base, "p99")),
        "  CONNACK p50 %.2f / %.2f ms, max %.2f / %.2f ms" % (
            med(base, "p50"), med(dash, "p50"), med(base, "max"), med(dash, "max")),
        "  gproxy hub held at most %.1f ms without, %.1f ms with the dashboard "
        "(of which on a CPU: %.1f / %.1f ms)" % (
            max(r[base]["hub_max_ms"] for r in result["rounds"]),
            max(r[dash]["hub_max_ms"] for r in result["rounds"]),
            max(r[base]["hub_max_cpu_ms"] for r in result["rounds"]),
            max(r[dash]["hub_max_cpu_ms"] for r in result["rounds"])),
        "  longest browser task %.0f ms (%d long tasks > 50 ms in all)" % (
            max(r[dash]["longest_task_ms"] for r in result["rounds"]),
            sum(r[dash]["longtasks"] for r in result["rounds"]))]
    for name, fig in result["admin"].items():
        lines.append("  GET %-28s %8d bytes, median %.1f ms, max %.1f ms" % (
            name, fig["bytes"], fig["median_ms"], fig["max_ms"]))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--short", action="store_true", help="300 sessions, 1 round, ~40 s")
    parser.add_argument("--sessions", type=int, help="idle sessions (default 9000)")
    parser.add_argument("--rounds", type=int, help="rounds of both phases (default 3)")
    parser.add_argument("--seconds", type=float, help="seconds of new clients per phase")
    parser.add_argument("--rate", type=float, default=100.0, help="new clients a second")
    parser.add_argument("--repeat", type=int, default=20, help="requests per Admin API view")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--serve", nargs=2, metavar=("CONFIG", "PROBE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        return serve(*args.serve)
    args.sessions = args.sessions or (300 if args.short else 9000)
    args.rounds = args.rounds or (1 if args.short else 3)
    args.seconds = args.seconds or (5.0 if args.short else 20.0)
    result = measure(args)
    print(summary(result))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
