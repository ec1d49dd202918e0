"""Reduce per-round samples to medians and ratios; print the table; write JSON + markdown.

Knows nothing about sockets or processes except what it reads to describe the
machine (/proc, ``--version`` style commands).
"""

import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import time

#: The order probe's rows: one per gap, keys order_swap_pct_<gap>us.
ORDER_ROWS = "order_swap_pct_"

#: (key, label, unit, better: "high" | "low" | None for context-only rows)
METRICS = [
    ("conn_rate", "connection rate", "conn/s", "high"),
    ("conn_p50_ms", "CONNACK latency p50", "ms", "low"),
    ("conn_p99_ms", "CONNACK latency p99", "ms", "low"),
    ("conn_proxy_cpu_us", "  proxy CPU per connection", "us", "low"),
    ("conn_proxy_cores", "  proxy CPU during conn", "cores", None),
    ("conn_broker_cores", "  broker CPU during conn", "cores", None),
    ("conn_loadgen_cores", "  load-gen CPU during conn", "cores", None),
    ("conn_machine_cores", "  whole machine busy", "cores", None),
    ("wsconn_rate", "ws connection rate", "conn/s", "high"),
    ("wsconn_p50_ms", "ws CONNACK latency p50", "ms", "low"),
    ("wsconn_p99_ms", "ws CONNACK latency p99", "ms", "low"),
    ("wsconn_proxy_cpu_us", "  proxy CPU per ws connection", "us", "low"),
    ("idle_kib_per_conn", "memory per idle conn", "KiB", "low"),
    ("tlsidle_kib_per_conn", "memory per idle TLS conn", "KiB", "low"),
    ("tput64_MBps", "throughput 64 B msgs", "MB/s", "high"),
    ("tput64_cpu_s_per_GB", "  proxy CPU per GB, 64 B", "s/GB", "low"),
    ("tput64_loadgen_cores", "  load-gen CPU, 64 B", "cores", None),
    ("tput16k_MBps", "throughput 16 KiB msgs", "MB/s", "high"),
    ("tput16k_cpu_s_per_GB", "  proxy CPU per GB, 16 KiB", "s/GB", "low"),
    ("flood16k_MBps", "throughput 16 KiB, no window", "MB/s", "high"),
    ("flood16k_cpu_s_per_GB", "  proxy CPU per GB, 16 KiB no window", "s/GB", "low"),
    ("single16k_MBps", "throughput 16 KiB, one a send", "MB/s", "high"),
    ("single16k_cpu_s_per_GB", "  proxy CPU per GB, 16 KiB one a send", "s/GB", "low"),
    ("oneway16k_MBps", "one way 16 KiB, no broker", "MB/s", "high"),
    ("oneway16k_cpu_s_per_GB", "  proxy CPU per GB, one way 16 KiB", "s/GB", "low"),
    ("wstput64_MBps", "ws throughput 64 B msgs", "MB/s", "high"),
    ("wstput64_cpu_s_per_GB", "  proxy CPU per GB, ws 64 B", "s/GB", "low"),
    ("wstput16k_MBps", "ws throughput 16 KiB msgs", "MB/s", "high"),
    ("wstput16k_cpu_s_per_GB", "  proxy CPU per GB, ws 16 KiB", "s/GB", "low"),
    ("tlsconn_rate", "TLS connection rate", "conn/s", "high"),
    ("tlsconn_p50_ms", "TLS CONNACK latency p50", "ms", "low"),
    ("tlsconn_p99_ms", "TLS CONNACK latency p99", "ms", "low"),
    ("tlsconn_proxy_cpu_us", "  proxy CPU per TLS conn", "us", "low"),
    ("tlsconn_proxy_cores", "  proxy CPU during TLS conn", "cores", None),
    ("tlsconn_loadgen_cores", "  load-gen CPU during TLS conn", "cores", None),
    ("tputtls16k_MBps", "TLS throughput 16 KiB msgs", "MB/s", "high"),
    ("tputtls16k_cpu_s_per_GB", "  proxy CPU per GB, TLS 16 KiB", "s/GB", "low"),
    ("ping_p50_us", "PINGREQ RTT p50", "us", "low"),
    ("ping_p99_us", "PINGREQ RTT p99", "us", "low"),
    ("ping_added_p50_us", "  added vs direct, p50", "us", "low"),
    ("ping_added_p99_us", "  added vs direct, p99", "us", "low"),
    ("loaded_ping_p50_us", "PINGREQ RTT p50 under load", "us", "low"),
    ("loaded_ping_p99_us", "PINGREQ RTT p99 under load", "us", "low"),
    ("loaded_added_p50_us", "  added vs direct, p50", "us", "low"),
    ("loaded_added_p99_us", "  added vs direct, p99", "us", "low"),
    ("loaded_sessions", "  idle sessions held meanwhile", "conns", None),
    ("loaded_msgs_per_s", "  messages delivered meanwhile", "msg/s", None),
    ("loaded_proxy_cores", "  proxy CPU meanwhile", "cores", None),
    (ORDER_ROWS, "later sender first, gap %s us", "%", "low"),
    ("core_conn_rate", "per core: connection rate", "conn/s", "high"),
    ("core_conn_proxy_cpu_us", "  proxy CPU per connection", "us", "low"),
    ("core_conn_proxy_side_busy", "  proxy's CPU busy", "cores", None),
    ("core_conn_load_side_busy", "  load side's CPU busy", "cores", None),
    ("core_tput64_MBps", "per core: throughput 64 B", "MB/s", "high"),
    ("core_tput64_cpu_s_per_GB", "  proxy CPU per GB, 64 B", "s/GB", "low"),
    ("core_tput16k_MBps", "per core: throughput 16 KiB", "MB/s", "high"),
    ("core_tput16k_cpu_s_per_GB", "  proxy CPU per GB, 16 KiB", "s/GB", "low"),
]
BASELINE = "haproxy"


def _run(cmd, cwd=None):
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=cwd)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (p.stdout + p.stderr).strip()
    return text.splitlines()[0] if text else None


def _read(path, default=None):
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return default


def _first_words(text, n=3):
    return text and " ".join(text.split()[:n])


def machine_facts(python, binaries):
    cpu = mem = None
    for line in (_read("/proc/cpuinfo", "") or "").splitlines():
        if line.startswith("model name") and cpu is None:
            cpu = line.split(":", 1)[1].strip()
    for line in (_read("/proc/meminfo", "") or "").splitlines():
        if line.startswith("MemTotal:"):
            mem = "%.1f GiB" % (int(line.split()[1]) / 2 ** 20)
    # From "/" so the interpreter's own gproxy answers, not a checkout in our cwd.
    versions = _run([python, "-c", "import gevent, gproxy, sys; print('python %s gevent %s "
                     "gproxy %s at %s' % (sys.version.split()[0], gevent.__version__, "
                     "gproxy.__version__, gproxy.__path__[0]))"], cwd="/") or ""
    v = dict(zip(versions.split()[0::2], versions.split()[1::2]))
    return {
        "host": socket.gethostname(), "nproc": os.cpu_count(), "cpu": cpu, "ram": mem,
        "kernel": platform.release(), "python": v.get("python"), "gevent": v.get("gevent"),
        "gproxy": v.get("gproxy"), "gproxy_path": v.get("at"),
        "haproxy": binaries.get("haproxy") and _first_words(_run([binaries["haproxy"], "-v"])),
        "nginx": binaries.get("nginx") and _run([binaries["nginx"], "-v"]),
        "mosquitto": binaries.get("mosquitto") and _run([binaries["mosquitto"], "-h"]),
        "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[1],
        "somaxconn": _read("/proc/sys/net/core/somaxconn"),
        "tcp_tw_reuse": _read("/proc/sys/net/ipv4/tcp_tw_reuse"),
        "ip_local_port_range": _read("/proc/sys/net/ipv4/ip_local_port_range"),
    }


def add_derived(samples):
    """Per round: each target's PINGREQ RTT minus direct's in the same round (idle, loaded)."""
    for workload, pre in (("ping", "ping_"), ("loaded", "loaded_")):
        direct = {s["round"]: s["metrics"] for s in samples
                  if s["target"] == "direct" and s["workload"] == workload}
        for s in samples:
            if s["workload"] != workload:
                continue
            d, m = direct.get(s["round"]), s["metrics"]
            for q in ("p50", "p99"):
                key = "%sping_%s_us" % ("" if pre == "ping_" else pre, q)
                if d and d.get(key) is not None and m.get(key) is not None:
                    m["%sadded_%s_us" % (pre, q)] = m[key] - d[key]


def metric_rows(med):
    """METRICS with the order probe's entry expanded to one row per gap found."""
    gaps = sorted({int(k[len(ORDER_ROWS):-2]) for m in med.values() for k in m
                   if k.startswith(ORDER_ROWS) and k.endswith("us")})
    out = []
    for key, label, unit, better in METRICS:
        if key == ORDER_ROWS:
            for n, gap in enumerate(gaps):
                text = label % gap
                out.append(("%s%dus" % (key, gap), text if n == 0 else "  " + text, unit,
                            better))
        else:
            out.append((key, label, unit, better))
    return out


def medians(samples, targets):
    out = {}
    for t in targets:
        values = {}
        for s in samples:
            if s["target"] != t:
                continue
            for k, v in s["metrics"].items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    values.setdefault(k, []).append(v)
        out[t] = {k: statistics.median(v) for k, v in values.items()}
    return out


def ratios(med, targets):
    base = med.get(BASELINE, {})
    out = {}
    for t in targets:
        if t in (BASELINE, "direct"):
            continue
        keys = {m[0] for m in metric_rows(med)}
        out[t] = {k: (v / base[k] if base.get(k) else None) for k, v in med[t].items()
                  if k in keys}
    return out


def fmt(v):
    if v is None:
        return "n/a"
    a = abs(v)
    return "%.0f" % v if a >= 100 else "%.1f" % v if a >= 10 else "%.2f" % v


def table_rows(med, rat, targets):
    ratio_targets = [t for t in targets if t in rat and t.startswith("gproxy")]
    head = ["metric", "unit"] + targets + ["%s/%s" % (t, BASELINE) for t in ratio_targets]
    rows = []
    for key, label, unit, better in metric_rows(med):
        if not any(key in med.get(t, {}) for t in targets):
            continue
        row = [label, unit] + [fmt(med.get(t, {}).get(key)) for t in targets]
        for t in ratio_targets:
            r = rat[t].get(key)
            row.append("" if better is None else "n/a" if r is None else "%.2fx" % r)
        rows.append(row)
    return head, rows


def text_table(head, rows):
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(head), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def markdown_table(head, rows):
    out = ["| " + " | ".join(head) + " |",
           "|" + "|".join(["---", "---"] + ["---:"] * (len(head) - 2)) + "|"]
    # Context rows are indented in the text table; markdown would eat the spaces.
    out += ["| " + " | ".join([r[0].replace("  ", "· ", 1)] + r[1:]) + " |" for r in rows]
    return "\n".join(out)


def write(results_dir, doc, head, rows):
    stamp = time.strftime("%Y%m%dT%H%M%S", time.localtime(doc["started"]))
    base = os.path.join(results_dir, "%s-%s" % (stamp, doc["machine"]["host"]))
    with open(base + ".json", "w") as fh:
        # default=str: an option the harness keeps as an object must never cost the run
        json.dump(doc, fh, indent=1, sort_keys=True, default=str)
    m = doc["machine"]
    lines = ["# gproxy benchmark %s" % stamp, "",
             "`%s` (%s mode, rounds: %d); medians over rounds. A ratio above 1 is worse for "
             "latency, memory and CPU, better for rates; · rows detail the row above, and rows "
             "in cores are context (no ratio)." % (
                 doc["command"], doc["mode"], doc["rounds"]), "",
             markdown_table(head, rows), "",
             "Machine: %s, %s cores (%s), %s RAM, kernel %s, Python %s, gevent %s, gproxy %s "
             "(%s); %s; %s; %s; RLIMIT_NOFILE %s." % (
                 m["host"], m["nproc"], m["cpu"], m["ram"], m["kernel"], m["python"],
                 m["gevent"], m["gproxy"], m.get("gproxy_path"), m["haproxy"], m["nginx"],
                 m["mosquitto"], m["nofile"]), ""]
    lines += ["Targets:"] + ["- %s: %s" % (t, n) for t, n in doc["target_notes"].items()]
    if doc["notes"]:
        lines += ["", "Notes:"] + ["- " + n for n in doc["notes"]]
    prof = doc.get("profile")
    if prof:
        lines += ["", "gproxy under py-spy (%d samples, %.0f conn/s while sampled), "
                  "hottest frames by own time:" % (prof["samples"],
                                                   prof["conn_rate_under_py_spy"])]
        lines += ["- %.0f%% `%s`" % (share * 100, frame) for frame, share in prof["self"][:8]]
    with open(base + ".md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return base
