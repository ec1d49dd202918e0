"""What a process hands its successor besides sessions, and when.

A live upgrade (``runtime.upgrade``, and an embedded proxy's ``hand_over``)
replaces one whole gproxy by another; the sessions move with
``runtime.handover``, and this module moves the rest, at three moments:

* **with the listeners** (``early``/``seed``), before the new process
  serves: DNS discovery's last good answers, so its first table has the
  same nodes even if the DNS is down as it starts.
* **with the sessions** (``process_state``/``carry_state``, the ``state``
  message): counters, health state, ``gproxy-limit-rate`` buckets and the
  ewma latencies, added to the new process's own.
* **after the commit** (``send``/``receive``, a ``carried`` message): what
  has one owner at a time.  The old process stops writing the store (the
  file store folds its journal), gives its fleet registration (the etcd
  lease, so the instance keeps its key and id) and its running fleet shares
  and eviction jobs (paused by ``hold`` since the freeze, or ``release``d
  if the handover fails); the new process, which has served nothing but
  sessions until then (``Gproxy(standby=True)``: its store read-only, its
  Admin API, control and metrics listeners not accepting, not registered),
  takes the store over, starts accepting, registers as the same instance
  and runs the jobs on.  If that message never comes, it goes live on its
  own (a fresh registration, no jobs).

Between two workers of one process (``--workers`` upgrade, rebalancing)
only sessions and counters move: the parents carry the rest.  Nothing here
touches a socket but the wire.
"""

import logging

from gproxy.runtime.wire import HandoverError

log = logging.getLogger("gproxy.upgrade")


# -- with the listeners -----------------------------------------------------------------
def early(app):
    discovery = app.discovery
    return {"discovery": dict(discovery.found) if discovery is not None else {}}


def seed(app, early_state):
    """Before the new process starts: what the old one knew that start-up asks for."""
    if app.discovery is not None and early_state:
        app.discovery.seed(early_state.get("discovery") or {})


# -- with the sessions ----------------------------------------------------------------------
def process_state(app):
    """Counters, health, rate-limit buckets, ewma: what the taker adds to its own."""
    health = {name: {addr: [n.healthy, n.success, n.tcp_failure, n.timeout_failure]
                     for addr, n in checker.state.nodes.items()}
              for name, checker in app.health.checkers.items()}
    rates = [[route, bucket.rate, bucket.burst, bucket.last,
              [[k, e, t] for k, (e, t) in bucket.buckets.items()]]
             for route, bucket in app.proxy.limits.rates.items()]
    balancing = getattr(app, "balancing", None)
    return {"totals": app.registry.totals(), "health": health, "rates": rates,
            "ewma": balancing.ewma.export() if balancing is not None else []}


def carry_state(app, state):
    if "totals" not in state:
        return  # sessions between two workers of one process: their counters stay put
    app.registry.carry(state["totals"])
    for name, nodes in state["health"].items():
        checker = app.health.checkers.get(name)
        for addr, (healthy, success, tcp, timeout) in nodes.items():
            node = checker.state.nodes.get(addr) if checker is not None else None
            if node is None:
                continue  # the upstream or node is gone from the new table
            node.healthy, node.success = healthy, success
            node.tcp_failure, node.timeout_failure = tcp, timeout
            (checker.state.unhealthy.discard if healthy else checker.state.unhealthy.add)(addr)
    limits = app.proxy.limits
    for route, rate, burst, used, buckets in state["rates"]:
        bucket = limits.bucket(route, {"rate": rate, "burst": burst}, used)
        for key, excess, last in buckets:
            bucket.buckets[key] = (excess, last)
    balancing = getattr(app, "balancing", None)
    if balancing is not None:
        balancing.ewma.merge(state.get("ewma") or ())


# -- after the commit -----------------------------------------------------------------------
def hold(app):
    """The freeze: eviction jobs and fleet shares pause before their next batch."""
    app.live().evictions.hold()


def release(app):
    """The handover failed: they go on here."""
    app.live().evictions.release()


def send(app, wire):
    """The old process, after the commit: hand over what has one owner at a time."""
    app.store.hand_over()
    fleet = app.fleet.hand_over() if app.fleet is not None else None
    wire.send({"op": "carried", "fleet": fleet,
               "evictions": app.live().evictions.hand_over()})


def receive(app, wire):
    """The new process, after the commit: take it, then serve as the whole gproxy."""
    try:
        carried, _ = wire.recv(expect="carried")
    except HandoverError as exc:
        log.error("upgrade: the old process sent no store, registration or jobs (%s): "
                  "going on without them", exc)
        carried = {}
    go_live(app, carried)


def go_live(app, carried):
    app.store.take_over()
    app.go_live()
    if app.fleet is not None:
        app.fleet.take_over(carried.get("fleet"))
    jobs = carried.get("evictions")
    if jobs:
        running = app.live().evictions.adopt(jobs)
        if running:
            log.warning("upgrade: eviction jobs %s go on here",
                        ", ".join(job.id for job in running))
