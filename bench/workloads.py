"""The workloads, seen from the harness: start workers, sample /proc, reduce.

Each function takes a started target (``port``, ``pid`` or None for direct),
the broker and the options, runs for a bounded time and returns a flat dict of
metrics.  Workers are forked processes (see loadgen.py); any that overstay
their deadline are killed by PID.  CPU use of the proxy, the broker and the
load generator is reported as "cores" (CPU seconds / wall seconds).
"""

import multiprocessing
import os
import time
from array import array

from bench import loadgen, pinning, procstat
from bench.targets import HOST

CTX = multiprocessing.get_context("fork")


def _spawn(fn, *args):
    here, there = CTX.Pipe()
    proc = CTX.Process(target=fn, args=(there,) + args, daemon=True)
    proc.start()
    there.close()
    return proc, here


def _receive(pipe, deadline):
    try:
        if pipe.poll(max(0.0, deadline - time.monotonic())):
            return pipe.recv()
    except (EOFError, OSError):
        pass
    return None


def _reap(workers, grace=3.0):
    """Join our worker processes; kill (by PID) those still running after ``grace`` s."""
    deadline = time.monotonic() + grace
    for proc, pipe in workers:
        proc.join(timeout=max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=3)
        pipe.close()


def _cpu(pid):
    return procstat.tree_cpu_seconds(pid) if pid else 0.0


def _sleep_until(t):
    while True:
        left = t - time.time()
        if left <= 0:
            return
        time.sleep(min(left, 0.1))


def settle(target, limit=3.0, quiet=0.05):
    """Wait (up to ``limit`` s) until the proxy tree is nearly idle: the end of a
    workload that closed thousands of sessions must not spill into the next."""
    if target.pid is None:
        return
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        c0 = _cpu(target.pid)
        time.sleep(0.2)
        if _cpu(target.pid) - c0 <= quiet * 0.2:
            return


def percentile(sorted_values, p):
    """Nearest-rank percentile of an already sorted sequence (None if empty)."""
    if not sorted_values:
        return None
    rank = max(1, int(round(p / 100.0 * len(sorted_values) + 0.5)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def _merge_errors(results):
    errors = {}
    for r in results:
        for k, v in (r or {}).get("errors", {}).items():
            errors[k] = errors.get(k, 0) + v
    return errors


def conn_rate(target, broker, opts, prefix, ws=False, duration=None, cpus=None, tls=None):
    """N processes: connect + CONNECT + CONNACK + DISCONNECT + close, for a duration.

    ``ws``: the same over WebSocket (upgrade first), for targets that speak it;
    the metrics are then named ``wsconn_*``.  ``cpus`` = (proxy CPUs, load
    CPUs) in the per-core mode: how busy each side's CPUs were is reported too.
    """
    if ws and not getattr(target, "websocket", False):
        return {}
    addr = (HOST, target.tls_port if tls else target.port)  # tls: tlsbench's (CA, SNI)
    wall = duration or opts.conn_duration
    start_at = time.time() + 0.5 + 0.02 * opts.conn_procs
    workers = [_spawn(loadgen.conn_worker, addr, prefix + b"%02d-" % i, start_at,
                      wall, opts.timeout, ws, tls) for i in range(opts.conn_procs)]
    sides = cpus or ()
    try:
        _sleep_until(start_at)
        proxy0, broker0 = _cpu(target.pid), _cpu(broker.pid)
        busy0 = procstat.machine_busy_seconds()
        side0 = [procstat.machine_busy_seconds(c) for c in sides]
        time.sleep(wall)
        proxy1, broker1 = _cpu(target.pid), _cpu(broker.pid)
        busy1 = procstat.machine_busy_seconds()
        side1 = [procstat.machine_busy_seconds(c) for c in sides]
        deadline = time.monotonic() + opts.timeout + 15
        results = [_receive(pipe, deadline) for _, pipe in workers]
    finally:
        _reap(workers)
    lat = array("d")
    for r in results:
        if r:
            lat.frombytes(r["latencies"])
    lat = sorted(lat)
    ok = len(lat)
    missing = sum(1 for r in results if r is None)
    out = {"conn_rate": ok / wall,
           "conn_p50_ms": _ms(percentile(lat, 50)), "conn_p99_ms": _ms(percentile(lat, 99)),
           "conn_ok": ok, "conn_errors": _merge_errors(results),
           "conn_proxy_cores": (proxy1 - proxy0) / wall if target.pid else None,
           "conn_proxy_cpu_us": (proxy1 - proxy0) / ok * 1e6 if target.pid and ok else None,
           "conn_machine_cores": (busy1 - busy0) / wall,
           "conn_broker_cores": (broker1 - broker0) / wall,
           "conn_loadgen_cores": sum(r["cpu"] for r in results if r) / wall}
    if missing:
        out["conn_errors"]["worker_lost"] = missing
    for name, c, b0, b1 in zip(("conn_proxy_side_busy", "conn_load_side_busy"), sides,
                               side0, side1):
        out[name] = (b1 - b0) / wall if c else None  # direct: no proxy CPU
    return {("ws" + k if ws else k): v for k, v in out.items()}


def _ms(seconds):
    return None if seconds is None else seconds * 1e3


def idle(target, broker, opts, prefix, tls=None, count=None, key="idle"):
    """RSS growth of the proxy's process tree per open, idle MQTT session.

    ``tls``: the sessions speak TLS to the target's TLS listener (tlsbench);
    ``count``: how many (default ``--idle-conns``); metrics named ``key_*``.
    """
    if target.pid is None:
        return {key + "_kib_per_conn": None}
    addr = (HOST, target.tls_port if tls else target.port)
    count = count or opts.idle_conns
    for i in range(50):  # warm up one-time allocations before the baseline
        sock = loadgen.mqtt_session(addr, prefix + b"w%03d" % i, opts.timeout, tls=tls)
        sock.sendall(b"\xe0\x00")
        sock.close()
    time.sleep(1.0)
    before = procstat.tree_rss_kib(target.pid)
    procs = opts.idle_procs
    shares = [count // procs + (1 if i < count % procs else 0) for i in range(procs)]
    hold = opts.idle_timeout + 30
    workers = [_spawn(loadgen.idle_worker, addr, prefix + b"%02d-" % i, n, opts.timeout, hold,
                      100, tls) for i, n in enumerate(shares)]
    done = False
    try:
        t0 = time.monotonic()
        deadline = t0 + opts.idle_timeout
        ready = [_receive(pipe, deadline) for _, pipe in workers]
        open_seconds = time.monotonic() - t0
        time.sleep(1.0)  # let the proxy finish its side of the last handshakes
        after = procstat.tree_rss_kib(target.pid)
        broker_rss = procstat.tree_rss_kib(broker.pid)
        for _, pipe in workers:
            try:
                pipe.send("close")
            except OSError:
                pass
        deadline = time.monotonic() + 60
        for _, pipe in workers:
            _receive(pipe, deadline)
        done = True
    finally:
        _reap(workers, 3.0 if done else 0.0)  # interrupted: they hold sockets, stop them now
    opened = sum(r["ok"] for r in ready if r)
    out = {"kib_per_conn": (after - before) / opened if opened else None,
           "opened": opened, "errors": _merge_errors(ready),
           "rss_before_kib": before, "rss_after_kib": after,
           "open_seconds": open_seconds, "broker_rss_kib": broker_rss}
    lost = sum(1 for r in ready if r is None)
    if lost:
        out["errors"]["worker_lost"] = lost
    time.sleep(1.0)  # the proxy tears the sessions down
    return {key + "_" + k: v for k, v in out.items()}


def throughput(target, broker, opts, prefix, payload_size, key, ws=False, duration=None,
               lead=1.0, cpus=None, tls=None, batch=256 * 1024, window=True,
               recv_size=1 << 20):
    """One publisher, one subscriber, both through the target; MB/s at the subscriber.

    ``ws``: both speak MQTT over WebSocket (MB/s of MQTT bytes, frame headers
    not counted), for targets that speak it.  ``lead`` s are allowed for the
    subscriber to subscribe; ``cpus`` is unused (the per-core mode passes it).
    ``batch``: bytes per publisher ``sendall`` (less than a frame: one frame a
    call); ``window`` False: the publisher is not held back (see loadgen);
    ``recv_size``: the subscriber's ``recv_into`` buffer.
    """
    if ws and not getattr(target, "websocket", False):
        return {}
    addr = (HOST, target.tls_port if tls else target.port)
    topic = b"bench/" + prefix
    received = CTX.RawValue("q", 0)
    warmup, duration = 0.5, duration or opts.tput_duration
    go_at = time.time() + lead
    start_at = go_at + warmup
    end_at = start_at + duration
    sub = _spawn(loadgen.subscriber, addr, prefix + b"sub", topic, received, start_at,
                 duration, opts.timeout, ws, tls, recv_size)
    workers = [sub]
    try:
        if _receive(sub[1], time.monotonic() + lead - 0.2) != "subscribed":
            raise RuntimeError("subscriber did not subscribe in time")
        workers.append(_spawn(loadgen.publisher, addr, prefix + b"pub", topic, payload_size,
                              received, go_at, end_at + 0.2,
                              opts.tput_window if window else None, opts.timeout, batch, ws,
                              tls))
        _sleep_until(start_at)
        proxy0 = _cpu(target.pid)
        broker0 = _cpu(broker.pid)
        _sleep_until(end_at)
        proxy1, broker1 = _cpu(target.pid), _cpu(broker.pid)
        deadline = time.monotonic() + opts.timeout + 10
        sub_r, pub_r = (_receive(pipe, deadline) for _, pipe in workers)
    finally:
        _reap(workers)
    if not sub_r or not pub_r or not sub_r["bytes"]:
        raise RuntimeError("throughput run failed: subscriber=%r publisher=%r" % (sub_r, pub_r))
    got, seconds = sub_r["bytes"], sub_r["seconds"]
    p = key + "_"
    return {p + "MBps": got / seconds / 1e6,
            p + "cpu_s_per_GB": (proxy1 - proxy0) / (got / 1e9) if target.pid else None,
            p + "proxy_cores": (proxy1 - proxy0) / duration if target.pid else None,
            p + "broker_cores": (broker1 - broker0) / duration,
            p + "loadgen_cores": (sub_r["cpu"] + pub_r["cpu"]) / (duration + warmup),
            p + "window_waits": pub_r["waits"]}


def ping(target, broker, opts, prefix):
    """PINGREQ/PINGRESP round trips, one at a time, over one established session.

    During the run the client (this process), the proxy tree and the broker
    are pinned to one CPU (``--ping-no-pin``: not): on a small VM a round trip
    that crosses CPUs pays the idle CPU's wake-up (it varied 3x between
    identical runs), which says nothing about the proxy; on one CPU the figure
    is the proxy's own path (plus two context switches per hop).
    """
    with pinned_for_ping(target, broker, opts):
        s = ping_loop((HOST, target.port), prefix + b"ping", opts, count=opts.ping_count)
    return {"ping_p50_us": percentile(s, 50) * 1e6, "ping_p99_us": percentile(s, 99) * 1e6,
            "ping_count": len(s)}


def pinned_for_ping(target, broker, opts):
    pids = [0]  # this process: the client
    if opts.ping_pin:
        for root in (target.pid, broker.pid):
            pids += procstat.descendants(root) if root else []
    cpu = max(os.sched_getaffinity(0))
    return pinning.Pinned([(pids if opts.ping_pin else [], {cpu})])


def ping_loop(addr, client_id, opts, count=None, seconds=None, warmup=200):
    """Sorted round-trip times (s) of ``count`` pings, or as many as fit in ``seconds``."""
    sock = loadgen.mqtt_session(addr, client_id, opts.timeout)
    samples = array("d")
    clock = time.perf_counter
    deadline = time.monotonic() + opts.ping_timeout
    if seconds is not None:
        deadline = min(deadline, time.monotonic() + seconds)
    try:
        i = 0
        while count is None or i < count + warmup:
            t0 = clock()
            sock.sendall(b"\xc0\x00")
            if loadgen.recv_exact(sock, 2) != b"\xd0\x00":
                raise RuntimeError("bad PINGRESP")
            if i >= warmup:  # the first ones warm caches and the scheduler
                samples.append(clock() - t0)
            i += 1
            if time.monotonic() > deadline:
                break
        sock.sendall(b"\xe0\x00")
    finally:
        sock.close()
    return sorted(samples)


WORKLOADS = {
    "idle": idle,
    "ping": ping,
    "conn": conn_rate,
    "tput64": lambda t, b, o, p: throughput(t, b, o, p, 64, "tput64"),
    "tput16k": lambda t, b, o, p: throughput(t, b, o, p, 16 * 1024, "tput16k"),
    # the independent harness's shape: four 16 KiB PUBLISHes a 64 KiB send, no
    # window (the chain backs up), 256 KiB reads at the subscriber
    "flood16k": lambda t, b, o, p: throughput(t, b, o, p, 16 * 1024, "flood16k",
                                              batch=64 * 1024, window=False,
                                              recv_size=256 * 1024),
    # an unbatched publisher: one 16 KiB PUBLISH a send
    "single16k": lambda t, b, o, p: throughput(t, b, o, p, 16 * 1024, "single16k", batch=1),
    # MQTT over WebSocket: gproxy only (the other targets would need an HTTP front)
    "wsconn": lambda t, b, o, p: conn_rate(t, b, o, p, ws=True),
    "wstput64": lambda t, b, o, p: throughput(t, b, o, p, 64, "wstput64", ws=True),
    "wstput16k": lambda t, b, o, p: throughput(t, b, o, p, 16 * 1024, "wstput16k", ws=True),
}
