"""The fleet run of scripts/scale.py (``--fleet``): tens of thousands of idle
sessions over gproxy's ``--workers``, several brokers and several client
processes, and what each gproxy process shows meanwhile.

One process may hold 20,000 descriptors here (RLIMIT_NOFILE) and gproxy holds
two a session, so 50,000 sessions need several workers (each its own
SO_REUSEPORT listener: the kernel spreads clients by their address and
port), several brokers (mosquitto holds one a client) and several client
processes.  The clients connect from several loopback source addresses
(127.0.0.1, .2, ...), so their ports are not all drawn from one address's
ephemeral range (28,232 ports here).  Everything runs on loopback.

Reported: RSS of every gproxy process and in all (and per session), CONNACK
latency of new clients while quiet and while the dashboard's sessions page
is polled, the sessions API's total and page time across the workers, and
the longest hub hold of each worker.
"""

import multiprocessing
import socket
import statistics
import time

from scale_setup import HOST, gc_passes, mqttwire, probe_holds, recv_exact

from bench.procstat import children, rss_kib  # (scale_setup put the repo on the path)

CTX = multiprocessing.get_context("fork")
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


def _client(pipe, port, source, first, count, batch):
    """Hold ``count`` idle sessions from ``source``; report, then wait to be told to close."""
    template = mqttwire.ConnectTemplate(b"fleet-")
    socks, errors = [], 0
    for start in range(first, first + count, batch):
        group = []
        for i in range(start, min(first + count, start + batch)):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.settimeout(30)
            try:  # the port is picked at connect, per destination: not one per source
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((source, 0))
                sock.connect((HOST, port))
                sock.sendall(template.build(i))
                group.append(sock)
            except OSError:
                errors += 1
                sock.close()
        for sock in group:
            try:
                if recv_exact(sock, 4) == mqttwire.CONNACK_OK:
                    socks.append(sock)
                    continue
            except (OSError, RuntimeError):
                pass
            errors += 1
            sock.close()
    pipe.send({"ok": len(socks), "errors": errors})
    pipe.recv()  # "close"
    for sock in socks:
        sock.close()
    pipe.send("closed")


class Clients:
    """``count`` idle sessions held by ``procs`` processes over ``sources`` addresses."""

    def __init__(self, port, count, procs, sources, batch=200):
        self.workers = []
        shares = [count // procs + (1 if i < count % procs else 0) for i in range(procs)]
        first = 0
        for i, share in enumerate(shares):
            here, there = CTX.Pipe()
            source = "127.0.0.%d" % (1 + i % sources)
            proc = CTX.Process(target=_client, args=(there, port, source, first, share, batch),
                               daemon=True)
            proc.start()
            self.workers.append((proc, here))
            first += share

    def wait(self, timeout):
        deadline = time.monotonic() + timeout
        out = {"ok": 0, "errors": 0}
        for proc, pipe in self.workers:
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                raise RuntimeError("a client process did not open its sessions in time")
            got = pipe.recv()
            out["ok"] += got["ok"]
            out["errors"] += got["errors"]
        return out

    def close(self):
        for proc, pipe in self.workers:
            try:
                pipe.send("close")
            except OSError:
                pass
        for proc, pipe in self.workers:
            if pipe.poll(60):
                pipe.recv()
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)


# -- gproxy's processes ----------------------------------------------------------------

def gproxy_rss(pid):
    """``{"parent": KiB, "workers": {pid: KiB}, "total": KiB}`` of gproxy's process tree."""
    workers = {child: rss_kib(child) for child in children(pid)}
    parent = rss_kib(pid)
    return {"parent": parent, "workers": workers, "total": parent + sum(workers.values())}


def worker_holds(probe, since, until, workers):
    """Per gproxy worker: its longest hub hold (wall and on a CPU, ms) and its longest
    garbage collection pass between two times."""
    found = probe_holds(probe, since, until, by_pid=True)
    passes = gc_passes(probe, since, until, by_pid=True)
    out = {}
    for pid in workers:
        holds = found.get(pid, [])
        out[pid] = {"max_ms": round(max((w for w, _ in holds), default=0.0), 2),
                    "max_cpu_ms": round(max((c for _, c in holds), default=0.0), 2),
                    "over_5ms": sum(1 for w, _ in holds if w > 5),
                    "gc_max_ms": round(max((ms for _, ms in passes.get(pid, [])),
                                           default=0.0), 2)}
    return out


def page_figures(get, repeat):
    """The sessions API across the workers: its total and the time of a page of 50."""
    import json
    times, total = [], None
    for _ in range(repeat):
        body, ms = get("/gproxy/sessions?page=1&page_size=50&sort=connected_at")
        times.append(ms)
        total = json.loads(body).get("total")
    stats, stats_ms = get("/gproxy/stats")
    return {"total": total, "live_sessions": json.loads(stats).get("live_sessions"),
            "page_median_ms": round(statistics.median(times), 1),
            "page_max_ms": round(max(times), 1), "stats_ms": round(stats_ms, 1)}


# -- the run ---------------------------------------------------------------------------

def measure(args, setup):
    """The fleet run; ``setup`` is scale_setup (its processes, probes, Admin API, clients)."""
    import resource
    import tempfile
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    workdir = tempfile.mkdtemp(prefix="gproxy-fleet-")
    procs, clients = [], None
    try:
        brokers = [setup.start_broker(workdir, "b%d" % i) for i in range(args.brokers)]
        procs += [p for p, _ in brokers]
        gp, stream, admin, probe = setup.start_gproxy(
            workdir, [p for _, p in brokers], extra=["--workers", str(args.workers)])
        procs.append(gp)
        time.sleep(1.0)
        idle_rss = gproxy_rss(gp.pid)
        t0 = time.monotonic()
        clients = Clients(stream, args.sessions, args.client_procs, args.sources)
        opened = clients.wait(args.sessions / 50 + 120)
        opened["seconds"] = round(time.monotonic() - t0, 1)
        print("%d idle sessions open in %.1fs (%d refused or failed)" % (
            opened["ok"], opened["seconds"], opened["errors"]), flush=True)
        time.sleep(3.0)  # the last relays started; parked set-up greenlets let go
        rss = gproxy_rss(gp.pid)
        broker_rss = sum(rss_kib(p.pid) for p in procs[:-1])
        get = lambda path: setup.get(admin, path)  # noqa: E731
        phases, next_id = {}, 0
        for phase in ("quiet", "sessions page polled"):
            poller = setup.Poller(admin) if phase != "quiet" else None
            since = time.time()
            lat = setup.connack_latencies(stream, args.seconds, args.rate, next_id)
            until = time.time()
            if poller is not None:
                poller.stop()
            next_id += len(lat)
            lat.sort()
            phases[phase] = {"n": len(lat), "p50": round(lat[len(lat) // 2], 2),
                             "p99": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 2),
                             "max": round(lat[-1], 2),
                             "workers": worker_holds(probe, since, until, rss["workers"])}
            print("%-22s CONNACK p50 %.2f p99 %.2f max %.2f ms; longest hub hold per worker "
                  "(ms, on a CPU, longest GC pass): %s" % (
                      phase, phases[phase]["p50"], phases[phase]["p99"], phases[phase]["max"],
                      " ".join("%.1f(%.1f, %.1f)" % (w["max_ms"], w["max_cpu_ms"], w["gc_max_ms"])
                               for w in phases[phase]["workers"].values())), flush=True)
        api = page_figures(get, args.repeat)
        return {"sessions": opened["ok"], "opened": opened, "workers": args.workers,
                "brokers": args.brokers, "sources": args.sources,
                "client_procs": args.client_procs, "rss_idle_kib": idle_rss,
                "rss_kib": rss, "broker_rss_kib": broker_rss, "phases": phases, "api": api}
    finally:
        if clients is not None:
            clients.close()
        setup.finish(reversed(procs), workdir, args.keep,
                     "probe.log: time, ms late, ms of it on a CPU, pid")


def summary(r):
    grown = r["rss_kib"]["total"] - r["rss_idle_kib"]["total"]
    lines = ["%d idle sessions over %d workers, %d brokers, %d client processes from %d "
             "source addresses:" % (r["sessions"], r["workers"], r["brokers"], r["client_procs"],
                                    r["sources"]),
             "  gproxy RSS %.0f MiB in all (parent %.0f MiB, workers %s MiB), %.2f KiB per "
             "session over its RSS before; brokers %.0f MiB" % (
                 r["rss_kib"]["total"] / 1024, r["rss_kib"]["parent"] / 1024,
                 "/".join("%.0f" % (k / 1024) for k in r["rss_kib"]["workers"].values()),
                 grown / max(1, r["sessions"]), r["broker_rss_kib"] / 1024)]
    for name, p in r["phases"].items():
        lines.append("  %-22s CONNACK p50 %.2f ms, p99 %.2f ms (max %.2f, %d clients); longest "
                     "hub hold of a worker %.1f ms (%.1f on a CPU)" % (
                         name, p["p50"], p["p99"], p["max"], p["n"],
                         max(w["max_ms"] for w in p["workers"].values()),
                         max(w["max_cpu_ms"] for w in p["workers"].values())))
    api = r["api"]
    lines.append("  sessions API across the workers: total %s (stats: %s live), a page of 50 "
                 "in %.1f ms median, %.1f ms max; /gproxy/stats %.1f ms" % (
                     api["total"], api["live_sessions"], api["page_median_ms"],
                     api["page_max_ms"], api["stats_ms"]))
    return "\n".join(lines)
