"""Read a process tree's memory and CPU from /proc (Linux only).

A target is measured as the process the harness started plus every live
descendant (nginx's worker, gproxy's ``--workers``), so multi-process proxies
are summed.  Only reads /proc; never signals anything.
"""

import os

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid):
    """/proc/<pid>/stat split after the ``(comm)`` field, which may hold spaces."""
    with open("/proc/%d/stat" % pid) as fh:
        text = fh.read()
    return text[text.rindex(")") + 2:].split()


def descendants(root):
    """``root`` and every live process below it."""
    children = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(name))[1])
        except (OSError, ValueError, IndexError):
            continue  # exited while we looked
        children.setdefault(ppid, []).append(int(name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def children(pid):
    """The processes ``pid`` started that are still its children (none if it is gone)."""
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid)) as fh:
            return [int(kid) for kid in fh.read().split()]
    except OSError:
        return []


def gone(pid):
    """True once ``pid`` has exited (a zombie waiting for its parent counts as gone)."""
    try:
        return _stat_fields(pid)[0] == "Z"
    except (OSError, IndexError):
        return True


def rss_kib(pid):
    """VmRSS of one process in KiB (0 if it is gone)."""
    try:
        with open("/proc/%d/status" % pid) as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid):
    """utime + stime of one process in seconds (0 if it is gone)."""
    try:
        fields = _stat_fields(pid)
    except OSError:
        return 0.0
    # After "(comm)": state=0 ppid=1 ... utime=11 stime=12 (proc(5) fields 14, 15).
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def tree_rss_kib(root):
    return sum(rss_kib(pid) for pid in descendants(root))


def tree_cpu_seconds(root):
    return sum(cpu_seconds(pid) for pid in descendants(root))


def self_cpu_seconds():
    """This process's own user + system CPU (for load-generator workers)."""
    t = os.times()
    return t.user + t.system


def machine_busy_seconds(cpus=None):
    """CPU seconds spent not idle, summed over all CPUs or over the CPU numbers in ``cpus``.

    From /proc/stat: the "cpu" line, or the "cpuN" lines.
    """
    wanted = None if cpus is None else {"cpu%d" % c for c in cpus}
    total = 0
    with open("/proc/stat") as fh:
        for line in fh:
            name, *rest = line.split()
            if not name.startswith("cpu"):
                break
            if (wanted is None and name != "cpu") or (wanted is not None and name not in wanted):
                continue
            fields = [int(v) for v in rest]
            idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
            total += sum(fields[:8]) - idle
    return total / CLK_TCK
