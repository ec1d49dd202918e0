"""Optional: sample gproxy with py-spy during a connection-rate run; summarise hot frames.

py-spy is not a dependency (``pip install py-spy``); without it this is skipped.
Reads py-spy's raw (collapsed-stack) output: ``frame;frame;...;leaf count``.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys

from bench import targets as tg, workloads

_LINE = re.compile(r"\s*\(([^)]*?)(?::\d+)?\)\s*$")


def find_py_spy(python):
    here = os.path.join(os.path.dirname(python), "py-spy")
    return here if os.access(here, os.X_OK) else shutil.which("py-spy")


def start(py_spy, pid, seconds, out_path):
    cmd = [py_spy, "record", "--pid", str(pid), "--duration", str(int(seconds)),
           "--rate", "200", "--nonblocking", "--format", "raw", "--output", out_path]
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)


def _frame(text):
    """``recv (gevent/_socketcommon.py:123)`` -> ``recv (gevent/_socketcommon.py)``."""
    m = _LINE.search(text)
    if not m:
        return text.strip()
    path = m.group(1)
    parts = path.split("/")
    short = "/".join(parts[-2:]) if len(parts) > 1 else path
    return "%s (%s)" % (text[:m.start()].strip(), short)


def summarise(raw_path, top=12):
    """``{"samples": n, "self": [(frame, share)], "inclusive": [(frame, share)]}``."""
    self_t, incl, total = {}, {}, 0
    with open(raw_path) as fh:
        for line in fh:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            frames = [_frame(f) for f in stack.split(";")]
            total += n
            self_t[frames[-1]] = self_t.get(frames[-1], 0) + n
            for f in set(frames):
                incl[f] = incl.get(f, 0) + n
    rank = lambda d: [(f, c / total) for f, c in sorted(d.items(), key=lambda kv: -kv[1])[:top]]
    return {"samples": total, "self": rank(self_t) if total else [],
            "inclusive": rank(incl) if total else []}


def print_summary(summary, stream=sys.stdout):
    print("py-spy: %d samples of gproxy during a connection-rate run (%.0f conn/s while "
          "sampled)" % (summary["samples"], summary.get("conn_rate_under_py_spy", 0)),
          file=stream)
    for title in ("self", "inclusive"):
        print("  hottest (%s):" % title, file=stream)
        for frame, share in summary[title]:
            print("    %5.1f%%  %s" % (share * 100, frame), file=stream)


def run(args, run_dir, broker, notes):
    """One extra connection-rate run of a fresh gproxy under py-spy; its summary or None."""
    py_spy = find_py_spy(args.python)
    if not py_spy:
        notes.append("--profile: py-spy not found (pip install py-spy): skipped")
        return None
    target = tg.Gproxy(run_dir, "gproxy-profiled", args.python, broker.port, args.sink.port,
                       shlex.split(args.gproxy_args), own_python=args.own_python)
    target.start()
    raw = os.path.join(run_dir, "gproxy-profile.txt")
    try:
        spy = start(py_spy, target.pid, max(2, args.conn_duration), raw)
        try:
            load = workloads.conn_rate(target, broker, args, b"c%sprof" % args.token)
            _, err = spy.communicate(timeout=args.conn_duration + 30)
        except BaseException:
            spy.kill()
            spy.wait(5)
            raise
    finally:
        target.stop()
    if spy.returncode or not os.path.exists(raw):
        notes.append("--profile: py-spy failed: %s" % err.decode(errors="replace")[-300:])
        return None
    summary = summarise(raw)
    summary["conn_rate_under_py_spy"] = load["conn_rate"]
    return summary
