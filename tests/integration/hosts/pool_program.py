"""A plain script that embeds gproxy and hands work to worker processes.

    python pool_program.py CONFIG {process|thread} {fork|spawn}

``fork``: a concurrent.futures ProcessPoolExecutor whose workers are forked from
this process after ``gproxy.start`` (they inherit the handle, which refuses them);
``spawn``: a multiprocessing Pool of fresh interpreters (they import this module
under the ``__main__`` guard, so they start no proxy of their own).  Each worker
relays a message through the proxy.  Prints one JSON report.
"""

import concurrent.futures
import json
import multiprocessing
import os
import sys

import gproxy
from tests.integration.embedding import embedded_below, gone, relays

HANDLE = None  # the proxy's handle, as a forked worker inherits it


def work(job):
    port, tag = job
    refused = None
    if HANDLE is not None:
        try:
            HANDLE.stats()
        except Exception as exc:
            refused = type(exc).__name__
    return (tag if relays(port, tag) else None), refused


def run_pool(kind, port):
    jobs = [(port, "w%d" % i) for i in range(4)]
    if kind == "fork":
        with concurrent.futures.ProcessPoolExecutor(
                3, mp_context=multiprocessing.get_context("fork")) as pool:
            results = list(pool.map(work, jobs))
            during = len(embedded_below(os.getpid()))
    else:
        with multiprocessing.get_context("spawn").Pool(3) as pool:
            results = pool.map(work, jobs)
            during = len(embedded_below(os.getpid()))
    return results, during


def main(config, mode, kind):
    global HANDLE
    proxy = HANDLE = gproxy.start(config, mode=mode)
    port = proxy.port
    results, during = run_pool(kind, port)
    report = {"relayed": [tag for tag, _ in results], "handles": [r for _, r in results],
              "proxies_during": during, "after_workers": relays(port, "after")}
    child = getattr(proxy, "pid", None)
    proxy.stop()
    report["left"] = [pid for pid in [child] if pid and not gone(pid)]
    print(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:4])
