#!/usr/bin/env python3
"""How long gproxy holds its hub: quiet sessions, a mass close, a mass idle-out.

    .venv/bin/python scripts/hub_holds.py                    # 9,000 sessions, ~1 min
    .venv/bin/python scripts/hub_holds.py --sessions 2000 --seconds 10

Starts two mosquitto brokers and gproxy with scale_setup.py's hub probe (a
greenlet in gproxy that sleeps 1 ms in a loop and logs each overshoot above
0.5 ms, with how much of it gproxy spent on a CPU), then, on loopback:

1. opens N sessions with no keep alive (idle timeout 600 s) and watches the
   hub for ``--seconds`` while they stay quiet: no session is due, so an
   idle sweeper that looks only at due sessions costs nothing here, and one
   that walks every session each second holds the hub once a second;
2. closes those all at once and watches the hub for 3 s: 9,000 relays
   ending, run by the event queue;
3. opens N with keep alive ``--keepalive`` (idle timeout 1.5 times it) in
   one burst and watches the hub until gproxy has closed them all: they all
   come due within a second or two, for the idle sweeper;
4. the garbage collector and accept bursts: with N quiet sessions live, N/3
   more open in bursts of 50 and stay (survivors are what brings on a full
   collection: Python runs one when they reach a quarter of the long-lived
   objects), then new clients come and go (``--churn-rate`` a second for
   ``--churn-seconds``); a full pass walks every object the collector
   tracks, so without gproxy's freezing (``--gc startup``: start-up's
   objects only, as before runtime/gcpolicy.py) its longest pass grows with
   N.  gproxy holds two descriptors a session: where N + N/3 would not fit
   in its limit (RLIMIT_NOFILE, 20,000 here: N above 7,400), as many quiet
   sessions as needed close first, so N stay live throughout (9,900 is
   the most this machine's limit allows).

Prints, for each phase, the probe's overshoots, the longest time gproxy held
the hub on a CPU, and Python's generation 1 and 2 garbage collections in
gproxy (a hold as long as one of those is the collector's).  The figures
count only while nothing else runs on the machine: the probe cannot tell a
busy machine from a busy hub (that is what the on-CPU column is for).
"""

import argparse
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scale_setup import (connack_latencies, finish, gc_passes, open_idle,  # noqa: E402
                         probe_holds, start_broker, start_gproxy)
from bench.procstat import cpu_seconds  # noqa: E402  (scale_setup put the repo on the path)


def closed_by_peer(socks):
    n = 0
    for sock in socks:
        sock.setblocking(False)
        try:
            n += sock.recv(1) == b""
        except BlockingIOError:
            pass
        except OSError:
            n += 1
    return n


class Phase:
    """One measured stretch: the probe's holds, GC passes and gproxy's CPU time."""

    def __init__(self, probe, pid):
        self.probe, self.pid = probe, pid
        self.since = self.cpu = None

    def begin(self):
        self.since, self.cpu = time.time(), cpu_seconds(self.pid)

    def report(self, name, closed=None):
        until = time.time()
        cpu = [c for _, c in probe_holds(self.probe, self.since, until)]
        passes = gc_passes(self.probe, self.since, until)
        line = ("%-30s overshoots > 0.5 ms: %4d, on a CPU >= 1 ms: %4d, longest on a CPU "
                "%.2f ms; GC passes of generation 1 / 2: %d / %d (longest %.1f ms); gproxy "
                "CPU %.2f s" % (
                    name, len(cpu), sum(c >= 1 for c in cpu), max(cpu, default=0.0),
                    sum(gen == 1 for gen, _ in passes), sum(gen == 2 for gen, _ in passes),
                    max((ms for _, ms in passes), default=0.0),
                    cpu_seconds(self.pid) - self.cpu))
        print(line + ("" if closed is None else "; sessions closed by gproxy %d" % closed),
              flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=9000)
    parser.add_argument("--seconds", type=float, default=30.0, help="of the quiet phase")
    parser.add_argument("--keepalive", type=int, default=4, help="of the idling-out sessions")
    parser.add_argument("--churn-rate", type=float, default=300.0,
                        help="new clients a second in the GC phase")
    parser.add_argument("--churn-seconds", type=float, default=20.0)
    parser.add_argument("--gc", choices=("rounds", "startup"), default="rounds",
                        help="gproxy's GC policy: freeze survivors every second (rounds, "
                        "gproxy's), or only start-up's objects (startup: before)")
    parser.add_argument("--grow", type=int, help="sessions the GC phase opens in bursts of 50 "
                        "(default N/3; the same number at every N compares holds by N alone)")
    parser.add_argument("--only-gc", action="store_true", help="skip phases 2 and 3")
    parser.add_argument("--keep", action="store_true", help="keep the work dir and its logs")
    args = parser.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    workdir = tempfile.mkdtemp(prefix="gproxy-holds-")
    procs, quiet, dying = [], [], []
    try:
        brokers = [start_broker(workdir, name) for name in ("a", "b")]
        procs += [p for p, _ in brokers]
        os.environ["GPROXY_HOLDS_GC"] = args.gc
        gp, stream, _, probe = start_gproxy(workdir, [p for _, p in brokers])
        procs.append(gp)
        measure = Phase(probe, gp.pid)
        quiet = open_idle(stream, args.sessions)
        time.sleep(3)  # the opening burst is over
        measure.begin()
        time.sleep(args.seconds)
        measure.report("%d quiet sessions, %.0f s:" % (len(quiet), args.seconds))
        grow = args.grow if args.grow is not None else len(quiet) // 3
        room = max(0, (hard - 150) // 2 - len(quiet) - 10)  # gproxy: 2 fds a session
        replaced = max(0, grow - room)
        for sock in quiet[:replaced]:
            sock.close()
        quiet = quiet[replaced:]
        time.sleep(2 if replaced else 0)  # those ends are not this phase's
        measure.begin()
        grown = open_idle(stream, grow, batch=50, prefix=b"grown-")
        latencies = connack_latencies(stream, args.churn_seconds, args.churn_rate, 0)
        measure.report("%d live + %d more in bursts of 50%s, %d came and went (GC %s):" % (
            len(quiet), len(grown), " (%d quiet ones closed first)" % replaced if replaced else "",
            len(latencies), args.gc))
        for sock in grown:
            sock.close()
        if args.only_gc:
            return 0
        measure.begin()
        for sock in quiet:  # gproxy holds two fds a session: one phase at a time
            sock.close()
        quiet = []
        time.sleep(3)
        measure.report("%d clients closing at once:" % args.sessions)
        dying = open_idle(stream, args.sessions, keepalive=args.keepalive, prefix=b"dying-")
        time.sleep(1)  # the opening burst is not the sweeper's (and it idles out ~6 s on)
        measure.begin()
        deadline = time.monotonic() + 1.5 * args.keepalive + 30
        closed = 0
        while time.monotonic() < deadline and closed < len(dying):
            time.sleep(1)
            closed = closed_by_peer(dying)
        time.sleep(1)
        measure.report("%d idling out together:" % len(dying), closed)
        return 0 if closed == len(dying) else 1
    finally:
        for sock in quiet + dying:
            sock.close()
        finish(procs, workdir, args.keep, "probe.log: wall time, ms late, ms of it on a CPU, pid")


if __name__ == "__main__":
    sys.exit(main())
