"""least_conn and ewma against APISIX's balancer modules (least_conn.lua, ewma.lua).

The expected picks come from the Lua rules written out here, not from the
code: least_conn scores a node ``(1 + in-flight) * (1 / weight)`` and takes
the lowest; ewma keeps ``ewma * w + rtt * (1 - w)`` with ``w = exp(-dt / 10)``
per node address, reads it decayed to now, forgets it after 60 s, and takes
the better of two distinct random nodes.
"""

import math
import random
from collections import Counter

import pytest

from gproxy.model.balancer import TYPES, Balancer, Node
from gproxy.model.loadaware import DECAY_TIME, SHM_TTL, EwmaTable, Shared
from gproxy.model.routes import RouteTable


def brokers(*weights):
    return [Node("10.0.0.%d" % i, 1883, w) for i, w in enumerate(weights, 1)]


def first(balancer, tried=(), unhealthy=()):
    return next(balancer.candidates(None, 1, unhealthy), None) if not tried else \
        balancer._groups[0].pick(None, set(tried))


def lua_scores(nodes, conns):
    return {n.addr: (1 + conns.get(n.addr, 0)) * (1 / n.weight if n.weight else math.inf)
            for n in nodes}


# -- least_conn ----------------------------------------------------------------------

def test_types_are_apisix_balancer_modules():
    assert TYPES == ("roundrobin", "chash", "least_conn", "ewma")


def test_least_conn_follows_the_lua_score_for_every_pick():
    nodes = brokers(3, 1, 2)
    balancer = Balancer(nodes, "least_conn")
    conns = Counter()
    for _ in range(60):
        scores = lua_scores(nodes, conns)
        best = min(scores.values())
        want = next(n.addr for n in nodes if scores[n.addr] == best)  # ties: listed first
        got = first(balancer)
        assert got.addr == want
        balancer.acquire(got)
        conns[got.addr] += 1
    # long-lived sessions end up in proportion to the weights
    assert [conns[n.addr] for n in nodes] == [30, 10, 20]


def test_release_gives_the_slot_back_and_a_weight_0_node_comes_last():
    nodes = brokers(1, 1, 0)
    balancer = Balancer(nodes, "least_conn")
    releases = [balancer.acquire(first(balancer)) for _ in range(4)]
    state = balancer._groups[0].state
    assert state.conns == {nodes[0].addr: 2, nodes[1].addr: 2}
    releases[0]()  # nodes[0] ends a session: it is the least loaded now
    assert first(balancer) == nodes[0]
    assert first(balancer, tried=[nodes[0], nodes[1]]) == nodes[2]  # only as a last resort


def test_counts_survive_a_table_swap_and_a_new_node_takes_the_next_sessions():
    shared = Shared()
    up = {"id": "1", "type": "least_conn", "nodes": {"10.0.0.1:1883": 1, "10.0.0.2:1883": 1}}
    table = RouteTable([], [up], shared=shared)
    old = table.upstreams["1"].balancer()
    held = [old.acquire(first(old)) for _ in range(10)]
    assert held and all(held)
    scaled = dict(up, nodes=dict(up["nodes"], **{"10.0.0.3:1883": 1}))
    new = RouteTable([], [scaled], shared=shared).upstreams["1"].balancer()
    picks = []
    for _ in range(5):
        node = first(new)
        new.acquire(node)
        picks.append(node.addr)
    assert picks == ["10.0.0.3:1883"] * 5  # the old sessions still count
    for release in held:  # sessions dialled on the old table end on the shared counts
        release()
    assert new._groups[0].state.conns == {"10.0.0.3:1883": 5}


def test_counts_are_per_upstream_and_priority():
    shared = Shared()
    a = Balancer(brokers(1, 1), "least_conn", name="/apisix/upstreams/a", shared=shared)
    b = Balancer(brokers(1, 1), "least_conn", name="/apisix/upstreams/b", shared=shared)
    a.acquire(brokers(1, 1)[0])
    assert first(b) == brokers(1, 1)[0]  # b does not see a's session
    nodes = [Node("10.0.0.1", 1883, 1, 1), Node("10.0.0.2", 1883, 1, 0)]
    grouped = Balancer(nodes, "least_conn", name="/apisix/upstreams/c", shared=shared)
    assert set(shared.least_conn) >= {"/apisix/upstreams/c#1", "/apisix/upstreams/c#0"}
    assert list(grouped.candidates(None, 2)) == nodes  # the higher priority first


def test_least_conn_skips_unhealthy_nodes_unless_all_are():
    nodes = brokers(1, 1, 1)
    balancer = Balancer(nodes, "least_conn")
    assert list(balancer.candidates(None, 3, {nodes[0].addr})) == nodes[1:]
    assert len(list(balancer.candidates(None, 3, {n.addr for n in nodes}))) == 3


def test_one_node_bypasses_the_picker_but_is_still_counted():
    node = brokers(1)[0]
    balancer = Balancer([node], "least_conn", name="/apisix/upstreams/1", shared=Shared())
    assert list(balancer.candidates(None, 1)) == [node]
    release = balancer.acquire(node)
    assert balancer._groups[0].state.conns == {node.addr: 1}
    release()
    assert balancer._groups[0].state.conns == {}


def test_other_balancers_count_nothing():
    for kind in ("roundrobin", "chash", "ewma"):
        assert Balancer(brokers(1, 1), kind).acquire(brokers(1, 1)[0]) is None


# -- ewma -----------------------------------------------------------------------------

class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def model_ewma(samples, now):
    """ewma.lua's estimate after ``samples`` [(time, rtt)], read at ``now``."""
    ewma, last = 0.0, None
    for at, rtt in samples:
        if last is not None and at - last > SHM_TTL:
            ewma, last = 0.0, None
        w = 0.0 if last is None else math.exp(-(at - last) / DECAY_TIME)
        ewma, last = ewma * w + rtt * (1 - w), at
    if last is None or now - last > SHM_TTL:
        return 0.0
    return ewma * math.exp(-(now - last) / DECAY_TIME)


def test_ewma_decays_like_the_lua_formula():
    clock = Clock()
    table = EwmaTable(clock)
    samples = []
    for step, rtt in [(0, 0.010), (1, 0.002), (5, 0.050), (30, 0.001), (100, 0.020)]:
        clock.now = 1000.0 + step
        table.observe("n:1", rtt)
        samples.append((clock.now, rtt))
        for later in (0, 3, 59, 61):
            clock.now = 1000.0 + step + later
            assert table.score("n:1") == pytest.approx(model_ewma(samples, clock.now))
        clock.now = 1000.0 + step


def test_ewma_takes_the_better_of_two_and_ignores_weights():
    clock = Clock()
    shared = Shared(clock, random.Random(7))
    nodes = brokers(100, 1)
    balancer = Balancer(nodes, "ewma", shared=shared)
    shared.ewma.observe(nodes[0].addr, 0.200)
    shared.ewma.observe(nodes[1].addr, 0.001)
    assert {first(balancer) for _ in range(20)} == {nodes[1]}
    # unknown latency scores 0: a new node is tried first
    three = brokers(1, 1, 1)
    shared.ewma.observe(three[0].addr, 0.5)
    shared.ewma.observe(three[1].addr, 0.5)
    picks = Counter(first(Balancer(three, "ewma", shared=shared)) for _ in range(300))
    assert picks[three[2]] == pytest.approx(200, abs=40)  # in 2 of the 3 possible pairs


def test_ewma_retries_skip_tried_and_unhealthy_nodes():
    nodes = brokers(1, 1, 1)
    balancer = Balancer(nodes, "ewma", shared=Shared(rng=random.Random(1)))
    for _ in range(20):
        tried = list(balancer.candidates(None, 3, {nodes[1].addr}))
        assert sorted(n.addr for n in tried) == sorted([nodes[0].addr, nodes[2].addr])


def test_ewma_learns_from_observe_on_the_balancer():
    clock = Clock()
    shared = Shared(clock)
    nodes = brokers(1, 1)
    Balancer(nodes, "ewma", shared=shared).observe(nodes[0], 0.25)
    assert shared.ewma.score(nodes[0].addr) == pytest.approx(0.25)
    Balancer(nodes, "roundrobin", shared=shared).observe(nodes[1], 0.25)
    assert shared.ewma.score(nodes[1].addr) == 0.0
