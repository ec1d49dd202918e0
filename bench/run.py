"""``python -m bench``: run the workloads against every target, interleaved, and report.

Order: for each round, for each target: start it fresh, run each workload,
stop it.  The broker runs for the whole benchmark.  Everything the harness
starts is torn down in ``finally``; SIGTERM and Ctrl-C end the run the same way.
"""

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

from bench import (loaded, oneway, order, percore, procstat, profile, report,  # noqa: E402
                   targets as tg, tlsbench, workloads)
from bench.options import parse_args  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKLOADS = dict(workloads.WORKLOADS, **loaded.WORKLOADS, **order.WORKLOADS,
                 **percore.WORKLOADS, **tlsbench.WORKLOADS, **oneway.WORKLOADS)
FD_RESERVE = 256  # listeners, logs, pipes


def raise_nofile():
    """Soft RLIMIT_NOFILE up to the hard limit; children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def build_targets(args, run_dir, broker, binaries, nofile, notes):
    sink = args.sink.port
    wanted = args.targets.split(",") if args.targets else None
    variant = "gproxy-w%d" % args.workers
    extra = shlex.split(args.gproxy_args)
    out = []

    def want(name):
        return wanted is None or name in wanted

    if want("direct"):
        out.append(tg.Direct(broker, sink))
    if want("haproxy"):
        if binaries["haproxy"]:
            out.append(tg.HAProxy(run_dir, binaries["haproxy"], broker.port, nofile, sink))
        else:
            notes.append("haproxy not found: skipped (apt-get install haproxy)")
    if want("nginx"):
        if binaries["nginx"] and os.path.exists(tg.NGINX_STREAM_MODULE):
            out.append(tg.Nginx(run_dir, binaries["nginx"], broker.port, nofile, sink))
        else:
            notes.append("nginx or its stream module not found: skipped "
                         "(apt-get install nginx-light libnginx-mod-stream)")
    if want("gproxy"):
        out.append(tg.Gproxy(run_dir, "gproxy", args.python, broker.port, sink, extra,
                             own_python=args.own_python))
    if want("gproxy-vars"):
        out.append(tg.GproxyVars(run_dir, args.python, broker.port, sink, extra,
                                 own_python=args.own_python))
    if wanted is not None and "gproxy-embedded" in wanted:  # opt-in: gproxy.start()
        out.append(tg.GproxyEmbedded(run_dir, args.python, broker.port, sink,
                                     own_python=args.own_python))
    if want(variant) or (wanted is None):
        if tg.gproxy_has_workers(args.python, ROOT if args.own_python else run_dir):
            out.append(tg.Gproxy(run_dir, variant, args.python, broker.port, sink,
                                 extra + ["--workers", str(args.workers)], args.workers,
                                 own_python=args.own_python))
        else:
            notes.append("`python -m gproxy --help` lists no --workers: %s skipped" % variant)
    if set(args.workloads) & set(tlsbench.WORKLOADS):  # each TLS-capable target gets a
        args.pki = tlsbench.Pki(run_dir)               # TLS listener with one certificate
        for target in out:
            if not isinstance(target, tg.Direct):
                target.pki = args.pki
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
        for position, w in enumerate(args.workloads):
            if target.workloads is not None and w not in target.workloads:
                continue  # not measured for this target: n/a in the table
            offset = target.log_size()
            prefix = b"c%s%d%d%s" % (args.token, rnd % 10, index, b"abcdefghijklmnopqrstuvwxyz"[
                position:position + 1])
            sample = {"round": rnd, "target": target.name, "workload": w, "metrics": {},
                      "background_cores": busy}
            t0 = time.monotonic()
            try:
                sample["metrics"] = WORKLOADS[w](target, broker, args, prefix)
                skipped = sample["metrics"].pop("skipped", None)
                note = "%s: %s" % (target.name, skipped)
                if skipped and note not in notes:
                    notes.append(note)
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
            if sample["metrics"]:  # a workload that does not apply to this target ran nothing
                time.sleep(0.5)
    finally:
        target.stop()


def progress(sample):
    m = sample["metrics"]
    keys = {x[0] for x in report.metric_rows({sample["target"]: m})}
    shown = ", ".join("%s=%s" % (k, report.fmt(v)) for k, v in m.items()
                      if isinstance(v, (int, float)) and k in keys)
    errs = {k: v for k, v in m.items() if k.endswith("_errors") and v}
    print("  round %d %-10s %-12s %5.1fs  %s%s%s" % (
        sample["round"] + 1, sample["target"], sample["workload"], sample["seconds"],
        shown or "-",
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
    if args.loaded_sessions > cap and "loaded" in args.workloads:
        notes.append("loaded-run sessions capped at %d (asked %d): fd limit %d" % (
            cap, args.loaded_sessions, nofile))
        args.loaded_sessions = cap
    args.token = os.urandom(2).hex().encode()
    binaries = {n: tg.find(n) for n in ("mosquitto", "haproxy", "nginx")}
    if not binaries["mosquitto"]:
        print("bench: mosquitto not found (apt-get install mosquitto)", file=sys.stderr)
        return 2
    started = time.time()
    run_dir = tempfile.mkdtemp(prefix="gproxy-bench-")
    broker = tg.Mosquitto(run_dir, binaries["mosquitto"])
    args.sink = order.Sink()
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
        args.sink.close()
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
           "options": {k: v for k, v in vars(args).items() if k not in ("token", "sink", "pki")},
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
