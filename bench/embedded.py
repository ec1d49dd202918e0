"""A plain (never monkey-patched) host program that embeds gproxy with ``gproxy.start``,
as docs/embedding.md shows: the ``gproxy-embedded`` bench target, and the host of
``bench.embedload`` (latency through an embedded gproxy while the host computes).

    python -m bench.embedded CONFIG [--mode thread|process|none] [--busy N] [--report FILE]

``--mode none`` starts no proxy (the direct case of ``embedload``: the same host
load, clients dial the broker); ``--busy N`` runs N CPU-bound Python threads the
whole time, started before gproxy is (what a host does when it renders a report,
parses a file or scores a model); ``--report`` writes JSON once gproxy is up (the
time ``start`` took, the host's RSS before and after, the child's pid, the time of
200 ``proxy.stats()`` calls) and again after it stopped (the time ``stop`` took).
Runs until SIGTERM/SIGINT, then stops gproxy the way the handle does.  Logging
and the fd limit are set as the ``gproxy`` command sets them.
"""

import argparse
import inspect
import json
import os
import signal
import sys
import threading
import time

import gproxy
from gproxy.cli import raise_fd_limit, setup_logging

CALLS = 200


def spin(stop):
    """Pure Python work that holds the GIL as long as the interpreter lets it."""
    n = 0
    while not stop.is_set():
        for _ in range(1000):
            n += 1


def write(path, report):
    if path:
        with open(path + ".tmp", "w") as fh:
            json.dump(report, fh)
        os.replace(path + ".tmp", path)


def call_times(proxy):
    """Microseconds of each of ``CALLS`` handle calls (the Admin API's stats)."""
    out = []
    for _ in range(CALLS):
        t = time.perf_counter()
        proxy.stats()
        out.append((time.perf_counter() - t) * 1e6)
    return out


def rss_kib():
    """This process's VmRSS (only with --report: another build's bench target runs this
    file's text outside the checkout, where ``bench`` does not import)."""
    from bench.procstat import rss_kib as of_pid
    return of_pid(os.getpid())


def start(config, mode):
    if "mode" in inspect.signature(gproxy.start).parameters:
        return gproxy.start(config, mode=mode)
    return gproxy.start(config)  # a build from before mode=: a hub thread, as "thread"


def run(args, stop):
    report = {"mode": args.mode, "busy": args.busy, "host_pid": os.getpid()}
    if args.report:
        report["host_rss_before_kib"] = rss_kib()
    t = time.perf_counter()
    proxy = None if args.mode == "none" else start(args.config, args.mode)
    report["start_s"] = time.perf_counter() - t
    if args.report:
        report["host_rss_after_kib"] = rss_kib()
    if proxy is not None and args.report:
        report["child_pid"] = getattr(proxy, "pid", None)
        report["call_us"] = call_times(proxy)
    write(args.report, report)
    while not stop.wait(1.0):  # the main thread idles as a host program would
        pass
    if proxy is not None:
        t = time.perf_counter()
        proxy.stop()
        report["stop_s"] = time.perf_counter() - t
    write(args.report, report)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.embedded")
    parser.add_argument("config")
    parser.add_argument("--mode", choices=("thread", "process", "none"), default="thread")
    parser.add_argument("--busy", type=int, default=0, metavar="N")
    parser.add_argument("--report", metavar="FILE")
    args = parser.parse_args(argv)
    setup_logging("warn")
    raise_fd_limit()
    stop, busy_stop = threading.Event(), threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    busy = [threading.Thread(target=spin, args=(busy_stop,), daemon=True)
            for _ in range(args.busy)]
    for thread in busy:
        thread.start()
    try:
        run(args, stop)
    finally:
        busy_stop.set()
    return 0


if __name__ == "__main__":
    sys.exit(main())
