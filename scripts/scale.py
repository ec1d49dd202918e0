#!/usr/bin/env python3
"""Does the live-sessions view hold a fleet?  Idle sessions, a dashboard, figures.

    .venv/bin/python scripts/scale.py                 # full: 9,000 idle sessions, 3 rounds
    .venv/bin/python scripts/scale.py --short         # 300 sessions, ~40 s (run by the tests)
    .venv/bin/python scripts/scale.py --sessions 5000 --rounds 2 --json out.json
    .venv/bin/python scripts/scale.py --fleet         # 50,000 sessions over 6 workers (below)
    .venv/bin/python scripts/scale.py --fleet --short # 3,000 over 2 workers (run by the tests)

Starts two mosquitto brokers and gproxy (one process, a chash route over both
brokers) on loopback, opens N idle MQTT sessions through it, then measures in
rounds, with and without the Connections page open in Debian's Chromium:

* new clients' CONNECT->CONNACK latency (TCP connect + CONNECT until CONNACK,
  paced, one at a time): p50 / p99 / max;
* how long gproxy's hub was held: a probe greenlet inside the gproxy process
  (scale_setup.py) sleeps 1 ms in a loop and logs every overshoot above 0.5 ms,
  and how much of it gproxy spent on a CPU (the rest it waited for a core);
* the browser's long tasks (PerformanceObserver 'longtask', > 50 ms each);
* Admin API answers: bytes and time of the page the dashboard asks for, of
  /stats, of "what would move", and of filtered views.

The script's own clients and the browser share the machine with gproxy, so
figures from a busy machine are noisy: compare the two columns of one run.
Needs mosquitto (/usr/sbin), chromium (/usr/bin) and Playwright for Python.

``--fleet`` is the other experiment: ``--sessions`` (50,000) idle sessions
through ``gproxy --workers`` (6), over ``--brokers`` (4) mosquittos, held by
``--client-procs`` (5) processes connecting from ``--sources`` (4) loopback
addresses (scale_fleet.py says why each is needed); then new clients' CONNACK
latency while quiet and while the dashboard's requests poll the sessions page
(no browser: the figures are gproxy's), the sessions API's total and page
time across the workers, RSS of every gproxy process and the longest hub hold
of each worker.
"""

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scale_setup import (HOST, KEY, Poller, connack_latencies, finish, gc_passes,  # noqa: E402
                         get, open_idle, probe_holds, start_broker, start_gproxy)
import scale_fleet  # noqa: E402,I100

CHROMIUM = "/usr/bin/chromium"
LONGTASKS = """
window.__longtasks = [];
new PerformanceObserver((list) => {
  for (const e of list.getEntries()) window.__longtasks.push(e.duration);
}).observe({type: "longtask", buffered: true});
"""


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0


# -- the Admin API ----------------------------------------------------------------------

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
            for phase in ("without dashboard", "its requests, no browser", "with dashboard"):
                poller = Poller(admin) if phase.startswith("its requests") else None
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
                full = [ms for gen, ms in gc_passes(probe, since, until) if gen == 2]
                row[phase].update(gc_full=len(full), gc_full_max_ms=max(full, default=0.0))
                if poller is not None:
                    poller.stop()
                if phase == "with dashboard":
                    tasks = dash.longtasks()
                    row[phase].update(rows_rendered=dash.rows(), longtasks=len(tasks),
                                      longest_task_ms=max(tasks, default=0.0))
                    dash.close()
                print("round %d %-18s p50 %.2f p99 %.2f max %.2f ms, hub max %.1f ms "
                      "(%.1f ms on a CPU), %d full GCs (max %.1f ms)%s" % (
                          r + 1, phase, row[phase]["p50"], row[phase]["p99"], row[phase]["max"],
                          row[phase]["hub_max_ms"], row[phase]["hub_max_cpu_ms"],
                          row[phase]["gc_full"], row[phase]["gc_full_max_ms"],
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
        finish(reversed(procs), workdir, False, None)


def summary(result):
    def med(phase, key):
        return statistics.median(r[phase][key] for r in result["rounds"])
    base, dash, bare = "without dashboard", "with dashboard", "its requests, no browser"
    lines = ["%d idle sessions, %d rounds (medians over rounds):" % (
        result["sessions"], len(result["rounds"])),
        "  CONNACK p99 without dashboard %.2f ms, with %.2f ms (rise %.2f ms); "
        "its requests without a browser %.2f ms" % (
            med(base, "p99"), med(dash, "p99"), med(dash, "p99") - med(base, "p99"),
            med(bare, "p99")),
        "  CONNACK p50 %.2f / %.2f ms, max %.2f / %.2f ms" % (
            med(base, "p50"), med(dash, "p50"), med(base, "max"), med(dash, "max")),
        "  gproxy hub held at most %.1f / %.1f / %.1f ms without / requests only / with "
        "the dashboard (of which on a CPU: %.1f / %.1f / %.1f ms)" % tuple(
            max(r[phase][key] for r in result["rounds"])
            for key in ("hub_max_ms", "hub_max_cpu_ms") for phase in (base, bare, dash)),
        "  longest browser task %.0f ms (%d long tasks > 50 ms in all)" % (
            max(r[dash]["longest_task_ms"] for r in result["rounds"]),
            sum(r[dash]["longtasks"] for r in result["rounds"]))]
    for name, fig in result["admin"].items():
        lines.append("  GET %-28s %8d bytes, median %.1f ms, max %.1f ms" % (
            name, fig["bytes"], fig["median_ms"], fig["max_ms"]))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--short", action="store_true", help="300 sessions, 1 round, ~40 s "
                        "(with --fleet: 3,000 over 2 workers)")
    parser.add_argument("--sessions", type=int, help="idle sessions (default 9000; fleet 50000)")
    parser.add_argument("--rounds", type=int, help="rounds of both phases (default 3)")
    parser.add_argument("--seconds", type=float, help="seconds of new clients per phase")
    parser.add_argument("--rate", type=float, default=100.0, help="new clients a second")
    parser.add_argument("--repeat", type=int, default=20, help="requests per Admin API view")
    parser.add_argument("--fleet", action="store_true", help="the fleet run (no browser): "
                        "--workers, --brokers, --client-procs, --sources")
    parser.add_argument("--workers", type=int, help="fleet: gproxy --workers (default 6)")
    parser.add_argument("--brokers", type=int, help="fleet: mosquitto brokers (default 4)")
    parser.add_argument("--client-procs", type=int, help="fleet: processes holding the "
                        "sessions (default 5)")
    parser.add_argument("--sources", type=int, help="fleet: client source addresses "
                        "127.0.0.1.. (default 4)")
    parser.add_argument("--keep", action="store_true", help="fleet: keep the work dir")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.fleet:
        small = dict(sessions=3000, workers=2, brokers=2, client_procs=2, sources=2, seconds=5)
        full = dict(sessions=50000, workers=6, brokers=4, client_procs=5, sources=4, seconds=20)
        for key, value in (small if args.short else full).items():
            if getattr(args, key) is None:
                setattr(args, key, value)
        import scale_setup
        result = scale_fleet.measure(args, scale_setup)
        print(scale_fleet.summary(result))
    else:
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
