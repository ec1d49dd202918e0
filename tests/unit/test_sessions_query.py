"""Live-session queries, placement and evictions, without sockets.

``Registry.query`` (filters, order, limit, the pauses between chunks),
``LiveSessions`` specs, ``Placement`` against the independent ring model in
tests/integration/helpers.py, APISIX's weight-0 semantics in the balancers,
the eviction pacer with a fake ``end_many``, and the worker channel's
chunked encoding.
"""

import json
import random

import gevent
import pytest

from gproxy.model.balancer import Balancer, ChashRing, Node, RoundRobin
from gproxy.model.placement import Placement
from gproxy.model.routes import RouteTable
from gproxy.proxy.sessions.evict import Evictions
from gproxy.proxy.sessions.live import LiveSessions, check_spec
from gproxy.proxy.sessions.registry import Registry
from gproxy.runtime.channel import decode, encode_large
from tests.integration.helpers import ApisixRing

A, B, C = "127.0.0.1:1883", "127.0.0.1:1884", "127.0.0.1:1885"


def add(reg, route_id="1", client_id=None, node=None, state="relaying", addr="10.0.0.5",
        bytes_in=0, hash_key=None, connected_at=None):
    info = reg.new_session((addr, 40000 + len(reg)), ("0.0.0.0", 9100))
    info.route_id, info.client_id, info.bytes_in = route_id, client_id, bytes_in
    info.hash_key = hash_key
    if connected_at is not None:
        info.connected_at = connected_at
    reg.add(info)
    reg.set_node(info, node)
    reg.set_state(info, state)
    return info


# -- Registry.query ------------------------------------------------------------------

def test_query_filters_orders_and_counts_every_match():
    reg = Registry()
    infos = [add(reg, client_id="c%d" % i, bytes_in=i % 3, node=(A, B)[i % 2])
             for i in range(10)]
    total, first, counts = reg.query(lambda i: i.node == A, limit=3, tally=lambda i: i.node)
    assert total == 5 and [i.id for i in first] == [infos[k].id for k in (0, 2, 4)]
    assert counts == {A: 5}
    # equal keys keep start order, ascending and descending
    _, first, _ = reg.query(key=lambda i: i.bytes_in, reverse=True)
    assert [i.bytes_in for i in first] == [2, 2, 2, 1, 1, 1, 0, 0, 0, 0]
    assert [i.id for i in first[:3]] == [infos[k].id for k in (2, 5, 8)]


def test_query_pauses_between_chunks_and_leaves_out_sessions_ended_meanwhile():
    reg = Registry()
    infos = [add(reg) for _ in range(1000)]
    pauses = []

    def pause():  # a session ends while the query has yielded
        pauses.append(1)
        if len(pauses) == 1:
            reg.remove(infos[0])

    total, first, _ = reg.query(pause=pause, every=256)
    assert len(pauses) == 3  # 4 chunks, a pause between each two
    assert total == 1000 and len(first) == 999 and infos[0] not in first


def test_sorting_never_orders_every_session_in_one_step():
    """The sort of every matched session was one step (20 ms at 50,000 sessions on
    the hub); now runs are sorted between pauses and merged only as far as the
    page goes."""
    reg = Registry()
    rng = random.Random(5)
    for _ in range(10000):
        add(reg, bytes_in=rng.randrange(50))
    steps, since = [], [0]

    def key(info):
        since[0] += 1
        return info.bytes_in

    def pause():
        steps.append(since[0])
        since[0] = 0

    total, first, _ = reg.query(key=key, reverse=True, limit=100, pause=pause)
    steps.append(since[0])
    assert total == 10000 and len(first) == 100
    assert max(steps) <= 1024, "one step sorted %d sessions" % max(steps)
    everyone = sorted(reg._live.values(), key=lambda i: i.bytes_in, reverse=True)
    assert first == everyone[:100]  # stable: ties in start order, as one sort had them


@pytest.mark.parametrize("reverse", [False, True])
def test_the_merged_runs_give_what_one_stable_sort_gives(reverse):
    reg = Registry()
    rng = random.Random(11)
    for _ in range(3000):
        add(reg, bytes_in=rng.randrange(7))
    key = lambda info: info.bytes_in  # noqa: E731
    want = sorted(reg._live.values(), key=key, reverse=reverse)
    for limit in (None, 1, 1500, 3000):
        _, first, _ = reg.query(key=key, reverse=reverse, limit=limit, pause=lambda: None)
        assert first == want[:limit]


# -- LiveSessions specs --------------------------------------------------------------

def test_spec_filters_and_sorts():
    reg = Registry()
    add(reg, "1", "alpha-1", A, addr="10.0.0.5", bytes_in=5, connected_at=1.0)
    add(reg, "1", "beta-2", B, addr="10.0.1.7", bytes_in=9, connected_at=2.0)
    add(reg, "2", "alpha-3", A, "preread", addr="10.0.1.8", bytes_in=1, connected_at=3.0)
    add(reg, "2", None, None, "preread", addr="192.168.1.1", connected_at=4.0)
    live = LiveSessions(reg, pause=lambda: None)

    def ids(**spec):
        return [s["client_id"] for s in live.query(spec)["list"]]

    assert ids() == ["alpha-1", "beta-2", "alpha-3", None]
    assert ids(client_id="alpha") == ["alpha-1", "alpha-3"]
    assert ids(route_id="2", state="preread") == ["alpha-3", None]
    assert ids(node=A) == ["alpha-1", "alpha-3"]
    assert ids(client_addr="10.0.1.0/24") == ["beta-2", "alpha-3"]
    assert ids(client_addr="10.0.0.5") == ["alpha-1"]
    assert ids(sort="-bytes_in") == ["beta-2", "alpha-1", "alpha-3", None]
    assert ids(sort="client_id") == [None, "alpha-1", "alpha-3", "beta-2"]
    assert ids(sort="-connected_at", offset=1, limit=2) == ["alpha-3", "beta-2"]
    assert live.query({"limit": 1})["total"] == 4
    got = live.query({"node": B})["list"][0]
    assert "hash_key" not in got and got["upstream_id"] is None
    json.dumps(got)  # JSON-ready


@pytest.mark.parametrize("spec,msg", [
    ({"sort": "node"}, "invalid sort: node"),
    ({"sort": "-"}, "invalid sort: -"),
    ({"state": "open"}, "invalid state: open"),
    ({"client_addr": "10.0.0.300"}, "invalid client_addr: 10.0.0.300"),
])
def test_bad_specs_are_refused(spec, msg):
    with pytest.raises(ValueError, match=msg):
        check_spec(spec)


# -- weight 0 as APISIX treats it ------------------------------------------------------

def test_weight_zero_roundrobin_never_picks_it():
    nodes = [Node("127.0.0.1", 1883, 2), Node("127.0.0.1", 1884, 0), Node("127.0.0.1", 1885, 1)]
    rr = RoundRobin(nodes, rng=random.Random(7))
    picked = {rr.pick().port for _ in range(300)}
    assert picked == {1883, 1885}


def test_weight_zero_chash_node_has_no_points_and_only_its_keys_move():
    nodes = [Node("127.0.0.1", p, 1) for p in (1883, 1884, 1885)]
    before = ChashRing(nodes)
    drained = [nodes[0], Node("127.0.0.1", 1884, 0), nodes[2]]
    after = ChashRing(drained)
    assert all(owner.port != 1884 for owner in after.owners())
    for i in range(2000):
        key = b"dev-%d" % i
        old, new = before.pick(key), after.pick(key)
        assert new.port != 1884
        if old.port != 1884:
            assert new.port == old.port, "a key that was not on the drained node moved"


# -- placement ---------------------------------------------------------------------------

def chash_table(nodes, route_id="1"):
    return RouteTable([{"id": route_id, "upstream": {
        "type": "chash", "key": "mqtt_client_id",
        "nodes": [{"host": h, "port": p, "weight": w} for h, p, w in nodes]}}], [])


def test_misplaced_after_adding_a_node_matches_the_ring_model():
    old = [("127.0.0.1", 1883, 1), ("127.0.0.1", 1884, 1)]
    new = old + [("127.0.0.1", 1885, 1)]
    old_ring, new_ring = ApisixRing(old), ApisixRing(new)
    reg = Registry()
    for i in range(600):
        cid = "dev-%d" % i
        add(reg, client_id=cid, node=old_ring.pick(cid), hash_key=cid.encode())
    place = Placement(chash_table(new))
    expected = {}
    for info in list(reg._live.values()):
        target = new_ring.pick(info.client_id)
        if target != info.node:
            expected[info.id] = target
    got = {}
    for info in list(reg._live.values()):
        misplaced, move_to = place.check(info)
        if misplaced:
            got[info.id] = move_to
    assert got == expected and expected
    assert set(expected.values()) == {C}  # a new node only takes keys, never shuffles
    live = LiveSessions(reg, lambda: chash_table(new), pause=lambda: None)
    found = live.query({"misplaced": True, "limit": 1000})
    assert found["total"] == len(expected)
    assert {s["id"]: s["move_to"] for s in found["list"]} == expected
    assert sum(found["per_node"].values()) == len(expected)


def test_key_kept_for_a_one_node_upstream_and_derived_for_roundrobin_sessions():
    reg = Registry()
    one = add(reg, client_id="dev-7", node=A, hash_key=b"dev-7")
    rr = add(reg, client_id="dev-8", node=A)  # dialled when the upstream was roundrobin
    nodes = [("127.0.0.1", 1883, 1), ("127.0.0.1", 1884, 1), ("127.0.0.1", 1885, 1)]
    ring, place = ApisixRing(nodes), Placement(chash_table(nodes))
    for info, cid in ((one, "dev-7"), (rr, "dev-8")):
        assert place.check(info) == (ring.pick(cid) != A, ring.pick(cid))


def test_key_derived_from_the_username_and_client_cn_variables():
    nodes = [("127.0.0.1", 1883, 1), ("127.0.0.1", 1884, 1), ("127.0.0.1", 1885, 1)]
    ring, reg = ApisixRing(nodes), Registry()
    for var, field in (("mqtt_username", "username"), ("tls_client_cn", "tls_client_cn")):
        table = RouteTable([{"id": "1", "upstream": {
            "type": "chash", "key": var,
            "nodes": [{"host": h, "port": p, "weight": w} for h, p, w in nodes]}}], [])
        for n in range(20):  # dialled when the upstream was roundrobin: no key kept
            info = add(reg, client_id="c-%d" % n, node=A)
            setattr(info, field, "%s-%d" % (field, n))
            expected = ring.pick("%s-%d" % (field, n))
            assert Placement(table).check(info) == (expected != A, expected)


def test_roundrobin_drain_route_gone_and_sessions_without_a_node():
    reg = Registry()
    on_a, on_b = add(reg, node=A), add(reg, node=B)
    gone = add(reg, route_id="9", node=A)
    waiting = add(reg, node=None, state="connecting")
    table = RouteTable([{"id": "1", "upstream": {"type": "roundrobin", "nodes": {
        A: 0, B: 1}}}], [])
    place = Placement(table)
    assert place.check(on_a) == (True, None)
    assert place.check(on_b) == (False, None)
    assert place.check(gone) == (False, None)
    assert place.check(waiting) == (False, None)


def test_upstream_by_id_is_looked_up_in_the_current_table():
    reg = Registry()
    info = add(reg, node=A, hash_key=b"k")
    table = RouteTable([{"id": "1", "upstream_id": "u"}],
                       [{"id": "u", "type": "roundrobin", "nodes": {B: 1}}])
    assert Placement(table).check(info) == (True, None)


# -- evictions -----------------------------------------------------------------------------

class FakeEnder:
    def __init__(self, live):
        self.live = set(live)
        self.calls = []

    def __call__(self, ids):
        self.calls.append((gevent.get_hub().loop.now(), list(ids)))
        ended = [sid for sid in ids if sid in self.live]
        self.live.difference_update(ended)
        return {"ended": len(ended), "failed": 0}


def wait_done(job, timeout=10):
    with gevent.Timeout(timeout):
        while job.state == "running":
            gevent.sleep(0.01)
    return job


def test_eviction_at_a_rate_keeps_the_pace_and_counts_what_had_ended():
    ids = ["p-%d" % i for i in range(30)]
    ender = FakeEnder(ids[:-2])  # the last two had ended by themselves
    jobs = Evictions(lambda spec: ids, ender)
    job = jobs.start({"node": A}, rate=100)
    assert job.as_dict()["total"] == 30 and job.remaining == 30
    wait_done(job)
    assert (job.state, job.done, job.gone, job.failed, job.remaining) == ("done", 28, 2, 0, 0)
    elapsed = job.finished_at - job.started_at
    assert 0.25 <= elapsed < 1.5, elapsed  # 29 intervals of 10 ms
    assert [sid for _, batch in ender.calls for sid in batch] == ids
    assert jobs.get(job.id) is job and job.selector == {"node": A}


def test_eviction_at_once_goes_in_batches_and_can_be_cancelled():
    ids = ["p-%d" % i for i in range(1000)]
    ender = FakeEnder(ids)
    job = wait_done(Evictions(lambda spec: ids, ender).start({}, rate=None))
    assert job.done == 1000 and max(len(b) for _, b in ender.calls) <= 256
    slow = Evictions(lambda spec: ids, FakeEnder(ids))
    job = slow.start({}, rate=20)
    gevent.sleep(0.2)
    slow.cancel(job.id)
    wait_done(job)
    assert job.state == "cancelled" and 0 < job.done < 20 and job.remaining > 900


# -- the workers' channel -------------------------------------------------------------

def test_large_replies_are_encoded_in_chunks_with_pauses():
    items = [{"id": "1-%d" % i, "client_id": "ü-%d" % i} for i in range(700)]
    pauses = []
    line = encode_large({"id": 4, "total": 700, "list": items}, lambda: pauses.append(1), 256)
    assert line.startswith(b"\n") and line.endswith(b"\n") and len(pauses) == 2
    assert decode(line.strip()) == {"id": 4, "total": 700, "list": items}
    assert decode(encode_large({"list": items[:3]}, None).strip()) == {"list": items[:3]}
    assert decode(encode_large({"list": items}, lambda: None).strip()) == {"list": items}


def test_balancer_candidates_of_a_drained_chash_upstream_skip_it():
    nodes = [Node("127.0.0.1", 1883, 1), Node("127.0.0.1", 1884, 0)]
    balancer = Balancer(nodes, "chash")
    for i in range(200):
        assert [n.port for n in balancer.candidates(b"k%d" % i, 2)] == [1883]
