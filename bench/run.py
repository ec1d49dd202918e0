"""``python -m bench``: run the workloads against every target, interleaved, and report.

Order: for each round, for each target: start it fresh, run each workload,
stop it.  The broker runs for the whole benchmark.  Everything the harness
starts is torn down in ``finally``; SIGTERM and Ctrl-C end the run the same way.
"""

import argparse
import os
import resource
import shlex
import shutil
import signal
import sys
import tempfile
import time

if __package__ in (None, ""):  # `python bench/run.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import procstat, profile, report, targets as tg, workloads  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_WORKLOADS = ["idle", "ping", "conn", "tput64", "tput16k"]
MODES = {  # rounds, conn s, tput s, ping count, idle conns
    "quick": dict(rounds=1, conn_duration=3.0, tput_duration=2.0, ping_count=1000,
                  idle_conns=2000),
    "full": dict(rounds=3, conn_duration=8.0, tput_duration=5.0, ping_count=5000,
                 idle_conns=10000),
}
FD_RESERVE = 256  # listeners, logs, pipes


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="CI mode: 1 round, short runs, "
                   "2000 idle conns (about 1-2 minutes)")
    p.add_argument("--targets", default=None, help="comma list from direct,haproxy,nginx,"
                   "gproxy,gproxy-wN,gproxy-embedded (default: all available but "
                   "gproxy-embedded)")
    p.add_argument("--workloads", default=",".join(ALL_WORKLOADS),
                   help="comma list from %s" % ",".join(ALL_WORKLOADS))
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
    p.add_argument("--ping-count", type=int, help="PINGREQ round trips per run")
    p.add_argument("--ping-timeout", type=float, default=60.0, help="seconds per ping run")
    p.add_argument("--ping-no-pin", dest="ping_pin", action="store_false",
                   help="do not pin client, proxy and broker to one CPU for the ping run")
    p.add_argument("--timeout", type=float, default=10.0, help="per-socket-operation timeout")
    p.add_argument("--wait-quiet", type=float, default=30.0,
                   help="before each target, wait up to this many seconds for other "
                   "processes to leave the CPUs idle (the machine may be shared)")
    p.add_argument("--python", default=sys.executable, help="interpreter that runs gproxy")
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
    args.workloads = [w for w in args.workloads.split(",") if w]
    bad = set(args.workloads) - set(ALL_WORKLOADS)
    if bad:
        p.error("unknown workload(s): %s" % ", ".join(sorted(bad)))
    return args


def raise_nofile():
    """Soft RLIMIT_NOFILE up to the hard limit; children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def build_targets(args, run_dir, broker, binaries, nofile, notes):
    wanted = args.targets.split(",") if args.targets else None
    variant = "gproxy-w%d" % args.workers
    extra = shlex.split(args.gproxy_args)
    out = []

    def want(name):
        return wanted is None or name in wanted

    if want("direct"):
        out.append(tg.Direct(broker))
    if want("haproxy"):
        if binaries["haproxy"]:
            out.append(tg.HAProxy(run_dir, binaries["haproxy"], broker.port, nofile))
        else:
            notes.append("haproxy not found: skipped (apt-get install haproxy)")
    if want("nginx"):
        if binaries["nginx"] and os.path.exists(tg.NGINX_STREAM_MODULE):
            out.append(tg.Nginx(run_dir, binaries["nginx"], broker.port, nofile))
        else:
            notes.append("nginx or its stream module not found: skipped "
                         "(apt-get install nginx-light libnginx-mod-stream)")
    if want("gproxy"):
        out.append(tg.Gproxy(run_dir, "gproxy", args.python, broker.port, extra))
    if wanted is not None and "gproxy-embedded" in wanted:  # opt-in: gproxy.start()
        out.append(tg.GproxyEmbedded(run_dir, args.python, broker.port))
    if want(variant) or (wanted is None):
        if tg.gproxy_has_workers(args.python, ROOT):
            out.append(tg.Gproxy(run_dir, variant, args.python, broker.port,
                                 extra + ["--workers", str(args.workers)], args.workers))
        else:
            notes.append("`python -m gproxy --help` lists no --workers: %s skipped" % variant)
    return out


ERROR_MARKS = (" [error] ", " [crit] ", " [alert] ", " [emerg] ", "Traceback", "[ALERT]")


def log_errors(text):
    lines = [ln for ln in text.splitlines() if any(m in ln for m in ERROR_MARKS)]
    return len(lines), (lines[0][:200] if lines else None)


QUIET_CORES = 0.25  # busy cores from processes that are not ours that we call "idle"


def background_cores(seconds=0.5):
    """Busy cores over a short sample while none of our load runs."""
    b0 = procstat.machine_busy_seconds()
    time.sleep(seconds)
    return (procstat.machine_busy_seconds() - b0) / seconds


def wait_quiet(limit):
    """Wait up to ``limit`` s for the machine to be idle; the last busy-cores reading."""
    deadline = time.monotonic() + limit
    busy = background_cores()
    if busy > QUIET_CORES and limit > 0:
        print("  waiting up to %.0fs: %.2f cores busy with other processes" % (limit, busy),
              flush=True)
    while busy > QUIET_CORES and time.monotonic() < deadline:
        busy = background_cores(1.0)
    return busy


def run_block(target, broker, args, rnd, index, samples, notes):
    """Start one target fresh, run every workload against it, stop it."""
    busy = wait_quiet(args.wait_quiet)
    if busy > QUIET_CORES:
        notes.append("round %d %s: machine not idle before the run (%.2f busy cores from "
                     "other processes): noisy" % (rnd + 1, target.name, busy))
    target.start()
    try:
        for w in args.workloads:
            offset = target.log_size()
            prefix = b"c%s%d%d%s" % (args.token, rnd % 10, index, w[0:1].encode())
            sample = {"round": rnd, "target": target.name, "workload": w, "metrics": {},
                      "background_cores": busy}
            t0 = time.monotonic()
            try:
                sample["metrics"] = workloads.WORKLOADS[w](target, broker, args, prefix)
            except Exception as exc:  # one failed workload must not end the benchmark
                sample["error"] = "%s: %s" % (type(exc).__name__, exc)
                notes.append("round %d %s %s failed: %s" % (rnd + 1, target.name, w,
                                                             sample["error"]))
            sample["seconds"] = time.monotonic() - t0
            n, first = log_errors(target.log_tail(offset, limit=1 << 20))
            if n:
                sample["log_errors"], sample["log_first_error"] = n, first
            if target.pid is not None and target.proc.poll() is not None:
                notes.append("%s exited (status %s) during %s" % (
                    target.name, target.proc.returncode, w))
                samples.append(sample)
                return
            samples.append(sample)
            progress(sample)
            time.sleep(0.5)
    finally:
        target.stop()


def progress(sample):
    m = sample["metrics"]
    shown = ", ".join("%s=%s" % (k, report.fmt(v)) for k, v in m.items()
                      if isinstance(v, (int, float)) and k in dict(
                          (x[0], 1) for x in report.METRICS))
    errs = {k: v for k, v in m.items() if k.endswith("_errors") and v}
    print("  round %d %-10s %-8s %5.1fs  %s%s%s" % (
        sample["round"] + 1, sample["target"], sample["workload"], sample["seconds"], shown,
        "  errors=%s" % errs if errs else "",
        "  log_errors=%d" % sample["log_errors"] if sample.get("log_errors") else ""),
        flush=True)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    nofile = raise_nofile()
    notes = []
    cap = (nofile - FD_RESERVE) // 2  # a proxy holds two fds per session
    if args.idle_conns > cap and "idle" in args.workloads:
        notes.append("idle connections capped at %d (asked %d): RLIMIT_NOFILE hard limit is %d "
                     "and a proxy holds 2 fds per session" % (cap, args.idle_conns, nofile))
        args.idle_conns = cap
    args.token = os.urandom(2).hex().encode()
    binaries = {n: tg.find(n) for n in ("mosquitto", "haproxy", "nginx")}
    if not binaries["mosquitto"]:
        print("bench: mosquitto not found (apt-get install mosquitto)", file=sys.stderr)
        return 2
    started = time.time()
    run_dir = tempfile.mkdtemp(prefix="gproxy-bench-")
    broker = tg.Mosquitto(run_dir, binaries["mosquitto"])
    targets = build_targets(args, run_dir, broker, binaries, nofile, notes)
    samples, prof = [], None

    def on_term(signum, frame):
        raise KeyboardInterrupt("SIGTERM")
    signal.signal(signal.SIGTERM, on_term)
    print("bench: %s mode, %d round(s), targets %s, workloads %s, run dir %s" % (
        args.mode, args.rounds, ",".join(t.name for t in targets), ",".join(args.workloads),
        run_dir), flush=True)
    try:
        broker.start()
        for rnd in range(args.rounds):
            for index, target in enumerate(targets):
                try:
                    run_block(target, broker, args, rnd, index, samples, notes)
                except RuntimeError as exc:  # a target that does not start
                    notes.append("round %d %s: %s" % (rnd + 1, target.name, str(exc)[:300]))
                    print("  " + notes[-1], flush=True)
        if args.profile:
            prof = profile.run(args, run_dir, broker, notes)
    except KeyboardInterrupt:
        notes.append("interrupted: partial results")
        print("bench: interrupted, tearing down", file=sys.stderr)
    finally:
        for target in targets:
            target.stop()
        broker.stop()
        if not args.keep_run_dir:
            shutil.rmtree(run_dir, ignore_errors=True)
    return finish(args, started, targets, samples, notes, prof, binaries)


def entry_point():
    script = os.path.basename(sys.argv[0]) if sys.argv else ""
    return "python bench/run.py" if script == "run.py" else "python -m bench"


def finish(args, started, targets, samples, notes, prof, binaries):
    names = [t.name for t in targets]
    report.add_derived(samples)
    med = report.medians([s for s in samples if "error" not in s], names)
    rat = report.ratios(med, names)
    head, rows = report.table_rows(med, rat, names)
    for s in samples:
        if s.get("log_errors"):
            notes.append("round %d %s %s: %d error log lines, first: %s" % (
                s["round"] + 1, s["target"], s["workload"], s["log_errors"],
                s["log_first_error"]))
    print()
    print(report.text_table(head, rows))
    for n in notes:
        print("note: " + n)
    if prof:
        profile.print_summary(prof)
    doc = {"started": started, "seconds": time.time() - started, "mode": args.mode,
           "rounds": args.rounds, "command": " ".join([entry_point()] + sys.argv[1:]),
           "options": {k: v for k, v in vars(args).items() if k != "token"},
           "machine": report.machine_facts(args.python, binaries),
           "target_notes": {t.name: t.note for t in targets},
           "samples": samples, "medians": med, "ratios_to_haproxy": rat, "notes": notes,
           "profile": prof}
    if not args.no_write:
        os.makedirs(args.results_dir, exist_ok=True)
        base = report.write(args.results_dir, doc, head, rows)
        print("wrote %s.json and %s.md" % (base, base))
    print("total %.0fs" % doc["seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
