"""The tables ``bench.embedload`` prints: latency per path, and what each mode costs."""


def line(r):
    return "%-7s host %-4s  " % (r["mode"], "busy" if r["busy"] else "idle") + "   ".join(
        "%s p50 %6.2f p99 %7.2f max %7.2f ms (%d)" % (
            k, r[k]["p50_ms"], r[k]["p99_ms"], r[k]["max_ms"], r[k]["samples"])
        for k in ("direct", "proxy", "command") if k in r)


def median(values):
    values = sorted(v for v in values if v is not None)
    return values[len(values) // 2] if values else None


def table(results, busy):
    """Markdown: per path, the median over runs of p50/p99/max, host idle and busy.
    The direct and command rows pool the pings of every run (each run pings every path)."""
    out = ["| through | host idle p50 / p99 / max (ms) | host busy (%d CPU-bound threads) "
           "p50 / p99 / max (ms) |" % busy, "| --- | ---: | ---: |"]
    paths = (("direct", lambda r: r["direct"]),
             ("gproxy command", lambda r: r.get("command")),
             ("embedded thread", lambda r: r["proxy"] if r["mode"] == "thread" else None),
             ("embedded process", lambda r: r["proxy"] if r["mode"] == "process" else None))
    for name, pick in paths:
        cells = []
        for b in (0, busy):
            rows = [pick(r) for r in results if r["busy"] == b and pick(r) is not None]
            cells.append(" / ".join("%.2f" % median(r[k] for r in rows)
                                    for k in ("p50_ms", "p99_ms", "max_ms")) if rows else "n/a")
        out.append("| %s | %s |" % (name, " | ".join(cells)))
    return "\n".join(out)


def costs(results):
    """Markdown: what each mode costs (medians over its runs, host idle / busy)."""
    out = ["| mode | start() (s), host idle / busy | host RSS growth (MiB) | child RSS (MiB) | "
           "proxy.stats() p50 (µs), host idle / busy |", "| --- | ---: | ---: | ---: | ---: |"]
    for mode in ("thread", "process"):
        rows = [r for r in results if r["mode"] == mode]
        if not rows:
            continue

        def split(key):
            return " / ".join(_fmt(median(r.get(key) for r in rows if bool(r["busy"]) == b),
                                   key) for b in (False, True))
        grow = median((r["host_rss_after_kib"] - r["host_rss_before_kib"]) / 1024 for r in rows)
        child = median(r.get("child_rss_kib", 0) / 1024 for r in rows)
        out.append("| %s | %s | %.1f | %s | %s |" % (
            mode, split("start_s"), grow, "%.1f" % child if mode == "process" else "-",
            split("call_p50_us")))
    return "\n".join(out)


def _fmt(value, key):
    if value is None:
        return "n/a"
    return "%.2f" % value if key.endswith("_s") else "%.0f" % value
