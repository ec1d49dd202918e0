"""Command-line options of ``python -m bench``: workloads, modes and every knob.

Pure argument handling: starts nothing, touches no process or socket.
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: In the order they run against each target.
ALL_WORKLOADS = ["idle", "ping", "loaded", "order", "conn", "tput64", "tput16k", "flood16k",
                 "single16k", "oneway16k", "wsconn", "wstput64", "wstput16k", "tlsconn",
                 "tlstput16k", "tlsidle", "core-conn", "core-tput64", "core-tput16k"]
PER_CORE = [w for w in ALL_WORKLOADS if w.startswith("core-")]
MODES = {
    "quick": dict(rounds=1, conn_duration=3.0, tput_duration=2.0, ping_count=1000,
                  oneway_gb=0.3, idle_conns=2000, loaded_duration=1.0, order_trials=300,
                  core_conn_duration=1.5, core_tput_duration=1.0,
                  workloads=[w for w in ALL_WORKLOADS if w != "core-tput64"]),
    "full": dict(rounds=3, conn_duration=8.0, tput_duration=5.0, ping_count=5000,
                 oneway_gb=1.0, idle_conns=10000, loaded_duration=4.0, order_trials=2000,
                 core_conn_duration=5.0, core_tput_duration=3.0, workloads=ALL_WORKLOADS),
}
ORDER_GAPS_US = "30,100,300,1000,5000"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench", description="Run the workloads "
                                "against every target, interleaved, and report.")
    p.add_argument("--quick", action="store_true", help="CI mode: 1 round, short runs, "
                   "2000 idle conns, no 64 B per-core run (about 3 minutes)")
    p.add_argument("--targets", default=None, help="comma list from direct,haproxy,nginx,"
                   "gproxy,gproxy-vars,gproxy-wN,gproxy-embedded (default: all available "
                   "but gproxy-embedded)")
    p.add_argument("--workloads", default=None,
                   help="comma list from %s (default: all; quick: all but core-tput64)"
                   % ",".join(ALL_WORKLOADS))
    p.add_argument("--no-per-core", dest="per_core", action="store_false",
                   help="skip the per-core workloads (%s)" % ",".join(PER_CORE))
    p.add_argument("--rounds", type=int, help="rounds (quick 1, full 3)")
    p.add_argument("--conn-duration", type=float, help="seconds per connection-rate run")
    p.add_argument("--conn-procs", type=int, default=4, help="connection-rate client processes")
    p.add_argument("--idle-conns", type=int, help="idle connections (quick 2000, full 10000; "
                   "capped by the fd limit)")
    p.add_argument("--idle-procs", type=int, default=4, help="processes opening idle conns")
    p.add_argument("--idle-timeout", type=float, default=180.0,
                   help="seconds allowed to open all idle connections")
    p.add_argument("--tput-duration", type=float, help="seconds per throughput run")
    p.add_argument("--tput-window", type=int, default=2 << 20,
                   help="bytes the publisher may be ahead of the subscriber")
    p.add_argument("--oneway-gb", type=float, help="GB per oneway16k run (quick 0.3, full 1)")
    p.add_argument("--ping-count", type=int, help="PINGREQ round trips per run")
    p.add_argument("--ping-timeout", type=float, default=60.0, help="seconds per ping run")
    p.add_argument("--ping-no-pin", dest="ping_pin", action="store_false",
                   help="do not pin client, proxy and broker to one CPU for the ping runs")
    p.add_argument("--loaded-sessions", type=int, default=5000,
                   help="idle sessions held during the loaded ping run (capped by the fd "
                   "limit)")
    p.add_argument("--loaded-rate", type=float, default=1000.0,
                   help="messages/s flowing during the loaded ping run")
    p.add_argument("--loaded-duration", type=float,
                   help="seconds of loaded ping round trips (quick 1, full 4)")
    p.add_argument("--order-gaps", default=ORDER_GAPS_US,
                   help="order probe: gaps between the two senders, comma list of us")
    p.add_argument("--order-trials", type=int, help="order probe: trials per gap "
                   "(quick 300, full 2000)")
    p.add_argument("--core-conn-duration", type=float,
                   help="seconds per per-core connection-rate run (quick 1.5, full 5)")
    p.add_argument("--core-tput-duration", type=float,
                   help="seconds per per-core throughput run (quick 1, full 3)")
    p.add_argument("--timeout", type=float, default=10.0, help="per-socket-operation timeout")
    p.add_argument("--wait-quiet", type=float, default=30.0,
                   help="before each target, wait up to this many seconds for other "
                   "processes to leave the CPUs idle (the machine may be shared)")
    p.add_argument("--python", "--gproxy-python", dest="python", default=sys.executable,
                   help="interpreter that runs gproxy; another venv's (an older build) "
                   "runs from the config dir so it imports its own gproxy")
    p.add_argument("--gproxy-args", default="", help="extra arguments for every gproxy target")
    p.add_argument("--workers", type=int, default=2,
                   help="N for the gproxy-wN variant (run only if gproxy offers --workers)")
    p.add_argument("--profile", action="store_true", help="after the rounds, one extra "
                   "connection-rate run of gproxy under py-spy (not in the medians)")
    p.add_argument("--results-dir", default=os.path.join(ROOT, "bench", "results"))
    p.add_argument("--no-write", action="store_true", help="print only; write no files")
    p.add_argument("--keep-run-dir", action="store_true",
                   help="keep configs and logs (in a temp dir) for debugging")
    args = p.parse_args(argv)
    args.mode = "quick" if args.quick else "full"
    for k, v in MODES[args.mode].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if isinstance(args.workloads, str):
        args.workloads = [w for w in args.workloads.split(",") if w]
    bad = set(args.workloads) - set(ALL_WORKLOADS)
    if bad:
        p.error("unknown workload(s): %s" % ", ".join(sorted(bad)))
    if not args.per_core:
        args.workloads = [w for w in args.workloads if w not in PER_CORE]
    try:
        args.order_gaps = [int(g) for g in args.order_gaps.split(",") if g]
    except ValueError:
        p.error("--order-gaps: a comma list of whole microseconds")
    args.own_python = os.path.abspath(args.python) == sys.executable
    args.cpus = sorted(os.sched_getaffinity(0))
    return args
