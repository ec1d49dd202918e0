"""The control-plane benchmark's figures: one row a phase, the summary, odd helpers."""

import re
import socket
import time

from scale_setup import HOST, recv_exact

from bench import mqttwire

COLUMNS = "%-5s %-26s %6s %8s %7s %7s %6s %7s %6s %5s %8s %8s %8s %8s" % (
    "gp", "phase", "secs", "hold ms", "cpu ms", "no-gc", ">1ms", "gc ms", "cpu s", "adm n",
    "adm p50", "adm p99", "conn p99", "ping p99")
HEADER = ("control plane vs data plane: %d relaying sessions, %d upstreams + as many "
          "routes\n" + COLUMNS)


def timed_lines(path, since, until):
    """The lines of a probe log (``time value value pid``) logged between two times."""
    out = []
    with open(path) as fh:
        for line in fh:
            at, a, b = (float(x) for x in line.split()[:3])
            if since <= at <= until:
                out.append((at, a, b))
    return out


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else None


def row(target, phase, seconds, holds_at, gcs, cpu, admin, connacks, pings, notes):
    """One phase's figures (milliseconds unless named otherwise); ``holds_at`` are the
    probe's ``(time, wall ms, on-CPU ms)``, ``gcs`` the GC passes' ``(time, gen, ms)``."""
    holds = [(wall, ran) for _, wall, ran in holds_at]
    answered = [x for x in admin or () if x is not None]
    ms = lambda v: None if v is None else v * 1000  # noqa: E731
    return {
        "target": target, "phase": phase, "seconds": seconds,
        "hold_ms": max((wall for wall, _ in holds), default=0.0),
        "hold_cpu_ms": max((ran for _, ran in holds), default=0.0),
        "holds_cpu_1ms": sum(ran >= 1 for _, ran in holds),
        "gc_ms": max((took for _, _, took in gcs), default=0.0),  # generation 1 and 2 passes
        # the longest on-CPU hold that overlaps no GC pass: the control plane's own code
        "hold_cpu_no_gc_ms": max((ran for at, wall, ran in holds_at
                                  if not any(at - wall / 1000 <= g and g - ms / 1000 <= at
                                             for g, _, ms in gcs)), default=0.0),
        "cpu_s": cpu,
        "admin_n": len(admin or ()), "admin_unanswered": len(admin or ()) - len(answered),
        "admin_p50_ms": ms(pct(answered, 0.5)), "admin_p99_ms": ms(pct(answered, 0.99)),
        "connack_n": len(connacks), "connack_p99_ms": ms(pct(connacks, 0.99)),
        "ping_n": len(pings), "ping_p99_ms": ms(pct(pings, 0.99)),
        "notes": "; ".join(v() if callable(v) else str(v) for v in notes.values()),
    }


def _f(value, digits=1):
    return "-" if value is None else "%.*f" % (digits, value)


def line(r):
    text = "%-5s %-26s %6.1f %8s %7s %7s %6d %7s %6s %5s %8s %8s %8s %8s" % (
        r["target"], r["phase"][:26], r["seconds"], _f(r["hold_ms"]), _f(r["hold_cpu_ms"]),
        _f(r["hold_cpu_no_gc_ms"]), r["holds_cpu_1ms"], _f(r["gc_ms"]), _f(r["cpu_s"], 2), r["admin_n"] or "-", _f(r["admin_p50_ms"]),
        _f(r["admin_p99_ms"]), _f(r["connack_p99_ms"]), _f(r["ping_p99_ms"], 2))
    if r["admin_unanswered"]:
        text += "  (%d Admin requests unanswered)" % r["admin_unanswered"]
    return text + ("\n      %s" % r["notes"] if r["notes"] else "")


def summary(rows, seconds):
    quiet = {r["target"]: r for r in rows if r["phase"] == "quiet"}
    print("\nlongest hold on a CPU per phase, and new clients' CONNACK p99 against the quiet "
          "phase (%.0f s in all):" % seconds)
    for r in rows:
        base = quiet.get(r["target"]) or {}
        print("  %-5s %-26s hold %7s ms (on a CPU %6s, outside GC %6s, GC pass %6s)"
              "   CONNACK p99 %7s ms (quiet %s)" % (
                  r["target"], r["phase"], _f(r["hold_ms"]), _f(r["hold_cpu_ms"]),
                  _f(r["hold_cpu_no_gc_ms"]), _f(r["gc_ms"]), _f(r["connack_p99_ms"]),
                  _f(base.get("connack_p99_ms"))))


def blocked(log_path):
    """gevent's monitor-thread reports in gproxy's log: where the hub was blocked."""
    with open(log_path, errors="replace") as fh:
        text = fh.read()
    reports = [r.split("\nInfo:")[0] for r in text.split("appears to be blocked")[1:]]
    print("\ngevent monitor: %d report(s) of the hub blocked for more than 10 ms" % len(reports))
    places = {}
    for report in reports:
        frames = re.findall(r'File "([^"]*/gproxy/[^"]*)", line (\d+), in (\w+)', report)
        place = "%s:%s %s" % frames[-1] if frames else "(outside gproxy)"
        places[place] = places.get(place, 0) + 1
    for place, count in sorted(places.items(), key=lambda kv: -kv[1])[:10]:
        print("  %4d  %s" % (count, place))


def dead_port():
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def retried(stream, clients=5):
    """Clients from 127.0.0.2 (the round-robin route whose 1e9-weight node is dead):
    how many got a CONNACK, and the slowest."""
    got, slowest = 0, 0.0
    for n in range(clients):
        start = time.perf_counter()
        try:
            with socket.create_connection((HOST, stream), timeout=10,
                                          source_address=("127.0.0.2", 0)) as sock:
                sock.sendall(mqttwire.connect(b"rr-%d" % n))
                got += recv_exact(sock, 4) == mqttwire.CONNACK_OK
        except (OSError, RuntimeError):
            pass
        slowest = max(slowest, time.perf_counter() - start)
    return "%d of %d clients got a CONNACK, slowest %.1f ms" % (got, clients, slowest * 1000)
