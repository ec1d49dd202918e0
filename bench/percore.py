"""Per-core mode: the proxy on its own CPU(s), the load generator and the broker on the rest.

While one of these workloads runs, every thread of the target's process tree
is pinned to the first ``workers`` CPUs (one for HAProxy ``nbthread 1``, nginx
with one worker, gproxy as one process) and the harness, its forked workers
and mosquitto to the remaining CPUs, like ``taskset -c 0 <proxy>`` and
``taskset -c 1 <load>``; everything is given its old affinity back after the
run.  So a proxy cannot borrow the load generator's CPU, and the figures are
the cost of one proxy core.  A target that needs more CPUs than the machine
has left after one for the load is skipped with a note.  Direct has no proxy:
its per-core connection rate is what the load side alone sustains.
"""

from bench import pinning, procstat, workloads


def per_core(fn, target, broker, opts, prefix, **kw):
    """Run ``fn`` with the proxy and the load on separate CPUs; its metrics prefixed core_."""
    split = pinning.split_cpus(opts.cpus, target.workers)
    if split is None:
        return {"skipped": "no per-core rows: they need %d CPUs (%d for the proxy, 1 for the "
                "load), the harness may use %d" % (target.workers + 1, target.workers,
                                                   len(opts.cpus))}
    proxy_cpus, load_cpus = split
    proxy = procstat.descendants(target.pid) if target.pid else []
    load = [0] + (procstat.descendants(broker.pid) if broker.pid else [])
    with pinning.Pinned([(proxy, proxy_cpus), (load, load_cpus)]):
        metrics = fn(target, broker, opts, prefix, cpus=(proxy_cpus, load_cpus), **kw)
    metrics["cpus"] = "proxy %s, load %s" % (sorted(proxy_cpus), sorted(load_cpus))
    return {"core_" + k: v for k, v in metrics.items()}


def core_conn(target, broker, opts, prefix):
    return per_core(workloads.conn_rate, target, broker, opts, prefix,
                    duration=opts.core_conn_duration)


def core_tput(payload_size, key):
    def run(target, broker, opts, prefix):
        if target.pid is None:
            return {}  # no proxy: nothing per core to add to the direct throughput rows
        return per_core(workloads.throughput, target, broker, opts, prefix,
                        payload_size=payload_size, key=key,
                        duration=opts.core_tput_duration)
    return run


WORKLOADS = {
    "core-conn": core_conn,
    "core-tput16k": core_tput(16 * 1024, "tput16k"),
    "core-tput64": core_tput(64, "tput64"),
}
