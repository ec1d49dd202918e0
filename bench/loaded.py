"""Latency under load: PINGREQ round trips while sessions are held and messages flow.

Through the target: ``--loaded-sessions`` (5000) idle MQTT sessions held open
by ``--idle-procs`` processes, and a publisher/subscriber pair moving
``--loaded-rate`` (1000) 64-byte QoS 0 messages a second on a fixed schedule.
Meanwhile one more session measures back-to-back PINGREQ round trips for
``--loaded-duration`` s, pinned exactly as the idle ``ping`` workload is (client,
proxy tree and broker on one CPU; the load's own processes are not), so the
two figures differ only by the load.
"""

import time

from bench import loadgen, mqttwire, workloads
from bench.targets import HOST
from bench.workloads import _cpu, _merge_errors, _reap, _receive, _spawn, percentile

PAYLOAD = 64


def _shares(total, procs):
    return [total // procs + (1 if i < total % procs else 0) for i in range(procs)]


def _expect(worker, what, timeout):
    got = _receive(worker[1], time.monotonic() + timeout)
    if got != what:
        raise RuntimeError("load worker did not report %r in time (got %r)" % (what, got))


def loaded(target, broker, opts, prefix):
    """PINGREQ RTT p50/p99 with sessions held and messages flowing through the target."""
    addr = (HOST, target.port)
    hold = opts.idle_timeout + opts.loaded_duration + 60
    holders = [_spawn(loadgen.idle_worker, addr, prefix + b"h%d-" % i, n, opts.timeout, hold)
               for i, n in enumerate(_shares(opts.loaded_sessions, opts.idle_procs))]
    flow, done = [], False
    topic = b"bench/" + prefix + b"load"
    try:
        deadline = time.monotonic() + opts.idle_timeout
        ready = [_receive(pipe, deadline) for _, pipe in holders]
        flow.append(_spawn(loadgen.counting_subscriber, addr, prefix + b"lsub", topic,
                           opts.timeout))
        _expect(flow[0], "subscribed", opts.timeout)
        flow.append(_spawn(loadgen.paced_publisher, addr, prefix + b"lpub", topic,
                           opts.loaded_rate, PAYLOAD, opts.timeout))
        _expect(flow[1], "ready", opts.timeout)
        time.sleep(0.3)  # the flow reaches its rate
        proxy0, t0 = _cpu(target.pid), time.monotonic()
        with workloads.pinned_for_ping(target, broker, opts):
            rtt = workloads.ping_loop(addr, prefix + b"lping", opts,
                                      seconds=opts.loaded_duration)
        wall, proxy1 = time.monotonic() - t0, _cpu(target.pid)
        pub_r, sub_r = _stop(flow[1], opts), _stop(flow[0], opts, linger=0.05)
        for _, pipe in holders:
            pipe.send("close")
        deadline = time.monotonic() + 60
        for _, pipe in holders:
            _receive(pipe, deadline)
        done = True
    finally:
        _reap(flow + holders, 3.0 if done else 0.0)  # interrupted: stop the holders now
    workloads.settle(target)
    frame = len(mqttwire.publish(topic, b"x" * PAYLOAD))
    out = {"loaded_ping_p50_us": percentile(rtt, 50) * 1e6,
           "loaded_ping_p99_us": percentile(rtt, 99) * 1e6, "loaded_ping_count": len(rtt),
           "loaded_sessions": sum(r["ok"] for r in ready if r),
           "loaded_errors": _merge_errors(ready),
           "loaded_msgs_per_s": sub_r and pub_r and sub_r["bytes"] / frame / pub_r["seconds"],
           "loaded_sent_per_s": pub_r and pub_r["sent"] / pub_r["seconds"],
           "loaded_proxy_cores": (proxy1 - proxy0) / wall if target.pid else None}
    lost = sum(1 for r in ready if r is None)
    if lost:
        out["loaded_errors"]["worker_lost"] = lost
    return out


def _stop(worker, opts, linger=0.0):
    time.sleep(linger)  # let the last messages in flight arrive
    try:
        worker[1].send("stop")
    except OSError:
        return None
    return _receive(worker[1], time.monotonic() + opts.timeout)


WORKLOADS = {"loaded": loaded}
