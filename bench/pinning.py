"""CPU affinity of the processes under test: pin for a while, then restore.

Affinity is per thread (``sched_setaffinity(tid)``), so a process is pinned by
pinning every thread listed in ``/proc/<pid>/task``; threads it starts later
inherit the affinity of the thread that starts them.  Pinning a running
process this way is what ``taskset -a -p -c`` does, and the same as starting
it under ``taskset -c`` as far as the scheduler is concerned.  Only reads
/proc and calls ``sched_setaffinity``; never signals anything.
"""

import os


def threads(pid):
    """Thread ids of ``pid`` (just ``pid`` if /proc cannot list them)."""
    try:
        return [int(t) for t in os.listdir("/proc/%d/task" % pid)]
    except OSError:
        return [pid]


def split_cpus(cpus, proxy_count):
    """``(proxy_cpus, load_cpus)`` for the per-core mode, or None if they do not fit.

    The proxy gets the first ``proxy_count`` CPUs, the load generator and the
    broker the rest; a target without a process of its own (direct) leaves the
    first CPU unused so its load side is the same as everyone else's.
    """
    cpus = sorted(cpus)
    first = max(1, proxy_count)
    if len(cpus) <= first:
        return None
    return set(cpus[:proxy_count]), set(cpus[first:])


class Pinned:
    """Pin groups of processes to CPU sets; give every thread its old affinity back.

    ``plan`` is a list of ``(pids, cpus)``; ``0`` in ``pids`` means this process.
    """

    def __init__(self, plan):
        self.plan = [([p for p in pids if p is not None], set(cpus)) for pids, cpus in plan]
        self.saved = {}

    def __enter__(self):
        for pids, cpus in self.plan:
            for pid in pids:
                for tid in threads(pid or os.getpid()):
                    try:
                        self.saved.setdefault(tid, os.sched_getaffinity(tid))
                        os.sched_setaffinity(tid, cpus)
                    except OSError:
                        pass  # it exited meanwhile
        return self

    def __exit__(self, *exc):
        for tid, cpus in self.saved.items():
            try:
                os.sched_setaffinity(tid, cpus)
            except OSError:
                pass  # it exited
        self.saved = {}
