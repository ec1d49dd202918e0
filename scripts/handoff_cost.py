#!/usr/bin/env python3
"""What moving one session costs, step by step, in CPU microseconds (in-process).

    .venv/bin/python scripts/handoff_cost.py             # 2,000 relays, best of 3 rounds
    .venv/bin/python scripts/handoff_cost.py --relays 500 --rounds 1

Builds N relays on socket pairs in one RelayHub and moves them to a second one
the way a live upgrade does (relay.handoff), timing each step with
``time.process_time`` (CPU of this process, so a busy machine slows it less
than it slows wall-clock figures): what the pre-copy costs (descriptors turned
into sockets), and what the freeze costs per session (quiesce and export,
JSON both ways, the relay rebuilt, started), then the old side's release.
Then the whole handover (runtime.handover's Giver and Taker, sessions
registered as the session room does) with both sides in this process: CPU
per session of the pre-copy and of the freeze up to the commit, which is what
a live upgrade's pause costs one core.
"""

import argparse
import json
import os
import resource
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import gevent  # noqa: E402

import gevent.socket  # noqa: E402

from bench.dataplane import data_path, relaying  # noqa: E402
from gproxy.proxy.relay import handoff  # noqa: E402
from gproxy.proxy.relay.hub import RelayHub  # noqa: E402
from gproxy.proxy.sessions.registry import SessionInfo  # noqa: E402
from gproxy.runtime import handover  # noqa: E402
from gproxy.runtime.wire import Wire  # noqa: E402


def one_round(count):
    old, new = RelayHub(), RelayHub()
    keep, relays = [], []
    for i in range(count):
        a, b = socket.socketpair()
        c, d = socket.socketpair()
        for s in (b, c):
            s.setblocking(False)
        info = SessionInfo("x-%d" % i, "127.0.0.1", 1, "127.0.0.1", 2)
        keep += [a, d]
        relays.append(old.start(b, c, info, lambda r: None, 600.0, mqtt=True))
    gevent.sleep(0.01)
    clock = time.process_time
    t = [clock()]
    fds = [[os.dup(fd) for fd in handoff.descriptors(r)] for r in relays]  # (SCM_RIGHTS)
    socks = [handoff.sockets(pair) for pair in fds]
    t.append(clock())
    states = [handoff.export(r) for r in relays]
    t.append(clock())
    states = json.loads(json.dumps(states))
    t.append(clock())
    moved = [handoff.resume(new, *handoff.endpoints(s, st, new.loop), r.info, lambda r: None, st)
             for s, st, r in zip(socks, states, relays)]
    t.append(clock())
    for r in moved:
        r.start()
    t.append(clock())
    for r in relays:
        handoff.release(r)
    t.append(clock())
    steps = ("pre-copy: sockets", "freeze: quiesce + export", "freeze: JSON out and in",
             "freeze: relay rebuilt", "freeze: started", "after: old side released")
    out = {name: (t[i + 1] - t[i]) * 1e6 / count for i, name in enumerate(steps)}
    for hub in (old, new):
        hub.close_all()
        hub.queue.close()
    for s in keep:
        s.close()
    return out


def whole_handover(count):
    """Giver and Taker in this process (runtime.handover), on ``count`` sessions:
    CPU seconds of the pre-copy and of the freeze (quiesce to commit), both
    sides together, i.e. what the pause costs one core."""
    old, new = data_path(), data_path()
    ends = [relaying(old, "s%d" % i) for i in range(count)]
    gevent.sleep(0.01)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    giver = handover.Giver(old, Wire(gevent.socket.socket(fileno=a.detach())))
    taker = handover.Taker(new, Wire(gevent.socket.socket(fileno=b.detach())))
    marks = {}
    stage = handover.Giver._stage

    def timed_stage(self, share):
        marks["start"] = time.process_time()
        stage(self, share)
        marks["staged"] = time.process_time()
    handover.Giver._stage = timed_stage
    try:
        took = gevent.spawn(lambda: (taker.listeners(), taker.take())[1])
        giver.prepare(settle=0)
        giver.commit()
        moved = took.get(timeout=60)
        marks["committed"] = time.process_time()  # (the release runs in commit: included)
    finally:
        handover.Giver._stage = stage
    assert moved == count, moved
    for app in (old, new):
        app.proxy.relays.close_all()
        app.proxy.relays.queue.close()
    for client, broker, _ in ends:
        client.close()
        broker.close()
    return {"pre-copy": (marks["staged"] - marks["start"]) * 1e6 / count,
            "freeze to commit, release included": (marks["committed"] - marks["staged"])
            * 1e6 / count}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--relays", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    rounds = [one_round(args.relays) for _ in range(args.rounds)]
    best = {name: min(r[name] for r in rounds) for name in rounds[0]}
    for name, us in best.items():
        print("%-28s %7.1f us/session" % (name, us))
    freeze = sum(us for name, us in best.items() if name.startswith("freeze"))
    print("%-28s %7.1f us/session (x 5,000 sessions: %.0f ms of CPU)"
          % ("freeze, relay only", freeze, freeze * 5000 / 1000))
    print("\nruntime.handover, both sides in this process, %d sessions:" % args.relays)
    whole = [whole_handover(args.relays) for _ in range(args.rounds)]
    for name in whole[0]:
        us = min(w[name] for w in whole)
        print("%-36s %7.1f us/session (x 5,000: %.0f ms of CPU)" % (name, us, us * 5))


if __name__ == "__main__":
    main()
