"""How long the hub is held: a diagnostic probe, off unless asked for.

Every session, the Admin API and the dashboard share one hub, and nothing may
hold it longer than a few milliseconds.  ``start(path)`` arms a 1 ms repeating
timer on the hub's loop (a C-level watcher: no greenlet, a few microseconds a
tick) and appends one line to ``path`` for every tick that came late:

    <unix time> hold <late ms> <cpu ms>

``late`` is how long past its time the tick ran, so how long something else
held the loop; ``cpu`` is how much of that the hub's thread spent on a CPU
(``thread_time``; the rest it waited for a core, which a busy machine causes
and gproxy does not, or for the GIL), so a figure taken on a shared machine
still means something.  Collections of
Python's garbage collector (generation 1 and 2, which hold the hub too) are
logged as ``<unix time> gc <generation> <ms>``.  ``read(path)`` parses the
file back.  The CLI starts it when ``GPROXY_HUB_PROBE`` names a file
(docs/operations.md); tests and benchmarks use it to check hub budgets.
Outside the package layers, like ``hub``.
"""

import gc
import time

import gevent

INTERVAL = 0.001
REPORT_OVER = 0.002  # seconds late before a tick is written down


def start(path, interval=INTERVAL, report_over=REPORT_OVER):
    """Arm the probe on the current hub; returns a function that stops it."""
    out = open(path, "a", buffering=1)
    loop = gevent.get_hub().loop
    due = [time.perf_counter() + interval, time.thread_time()]

    def tick():
        now, cpu = time.perf_counter(), time.thread_time()
        late = now - due[0]
        if late > report_over:
            out.write("%.4f hold %.3f %.3f\n" % (time.time(), late * 1000,
                                                  min(late, cpu - due[1]) * 1000))
        due[0], due[1] = now + interval, cpu

    started = {}

    def collections(phase, info):
        if phase == "start":
            started["at"] = time.perf_counter()
        elif info["generation"] >= 1 and "at" in started:
            out.write("%.4f gc %d %.3f\n" % (time.time(), info["generation"],
                                             (time.perf_counter() - started.pop("at")) * 1000))

    timer = loop.timer(interval, interval)
    timer.start(tick)
    gc.callbacks.append(collections)

    def stop():
        timer.stop()
        gc.callbacks.remove(collections)
        out.close()
    return stop


def read(path, since=0.0, until=float("inf")):
    """``(holds, collections)`` logged between two unix times: ``[(late ms, cpu ms)]``
    and ``[(generation, ms)]``."""
    holds, passes = [], []
    try:
        with open(path) as fh:
            lines = fh.read().splitlines()
    except FileNotFoundError:
        return holds, passes
    for line in lines:
        parts = line.split()
        if len(parts) != 4 or not since <= float(parts[0]) <= until:
            continue
        if parts[1] == "hold":
            holds.append((float(parts[2]), float(parts[3])))
        elif parts[1] == "gc":
            passes.append((int(parts[2]), float(parts[3])))
    return holds, passes
