"""Route tables updated from changes: what did not change is kept, and the result
is the table a fresh build would give.

``RouteTable.updated`` makes the next table from the last one and a group of
store changes.  Checked here: objects that did not change are the same
objects (an update costs what changed, not the table's size); an upstream
whose nodes and balancing did not change keeps its balancer (its ring, its
round-robin place) and its health; load order follows APISIX's rule for
etcd (new keys last, changed ones in place, a reload's order when told);
and, over random sequences of changes, the updated table matches what
``RouteTable`` builds from the final data.
"""

import random

from hypothesis import given, settings, strategies as st

from gproxy.model.routes import RouteTable
from gproxy.proxy.health import HealthCheckers

CHECKS = {"active": {"type": "tcp", "healthy": {"interval": 1}}}


def upstream(id_, *ports, **extra):
    return dict({"id": id_, "type": "roundrobin",
                 "nodes": [{"host": "127.0.0.1", "port": p, "weight": 1} for p in ports]},
                **extra)


def route(id_, **extra):
    return dict({"id": id_}, **extra)


def table():
    return RouteTable([route("r1", server_port=1, upstream_id="u1"),
                       route("r2", server_port=2, upstream=upstream(None, 3, 4))],
                      [upstream("u1", 1, 2), upstream("u2", 5, 6)])


def test_what_did_not_change_is_the_same_object():
    old = table()
    new = old.updated([("upstreams", "u1", upstream("u1", 7, 8))])
    assert new is not old and new.upstreams["u1"] is not old.upstreams["u1"]
    assert new.upstreams["u2"] is old.upstreams["u2"]
    assert [r for r in new.routes] == [r for r in old.routes]  # the same Route objects
    assert old.upstreams["u1"].nodes[0].port == 1  # the old table is untouched


def test_a_big_table_keeps_all_but_the_changed_objects():
    n = 10000
    old = RouteTable([route("r%d" % i, server_port=i % 65535 + 1, upstream_id="u%d" % i)
                      for i in range(n)], [upstream("u%d" % i, 1000 + i % 1000) for i in range(n)])
    pauses = []
    new = old.updated([("upstreams", "u5", upstream("u5", 9)), ("stream_routes", "r7", None)],
                      pause=lambda: pauses.append(1))
    kept = sum(new.upstreams[k] is old.upstreams[k] for k in old.upstreams)
    assert kept == n - 1 and len(new.routes) == n - 1
    assert sum(a is b for a, b in zip(new.routes, old.routes[:7] + old.routes[8:])) == n - 1
    assert pauses  # the caller's pause runs between changes


def test_an_upstream_edit_that_keeps_its_nodes_keeps_its_balancer_and_position():
    old = table()
    balancer = old.upstreams["u1"].balancer()
    picks = [next(balancer.candidates(b"", 1)).port for _ in range(3)]
    edited = upstream("u1", 1, 2, desc="renamed", labels={"team": "a"}, checks=CHECKS)
    new = old.updated([("upstreams", "u1", edited)])
    assert new.upstreams["u1"].conf is edited
    assert new.upstreams["u1"].balancer() is balancer
    after = next(new.upstreams["u1"].balancer().candidates(b"", 1)).port
    assert picks[1] != picks[0] and after == picks[1]  # the walk went on: 1, 2, 1, 2


def test_a_chash_ring_is_kept_when_only_the_description_changes():
    conf = upstream("u1", 1, 2, 3)
    conf.update(type="chash", key="remote_addr")
    old = RouteTable([], [conf])
    ring = old.upstreams["u1"].balancer()
    new = old.updated([("upstreams", "u1", dict(conf, desc="x"))])
    assert new.upstreams["u1"].balancer() is ring
    weighted = dict(conf, nodes=[dict(n, weight=2) if n["port"] == 1 else n
                                 for n in conf["nodes"]])
    assert new.updated([("upstreams", "u1", weighted)]).upstreams["u1"].balancer() is not ring
    retyped = dict(conf, type="roundrobin")
    assert new.updated([("upstreams", "u1", retyped)]).upstreams["u1"].balancer() is not ring


def test_a_route_edit_keeps_its_inline_upstreams_balancer():
    old = table()
    inline = old.routes[1].upstream.balancer()
    new = old.updated([("stream_routes", "r2", route("r2", server_port=22,
                                                     upstream=upstream(None, 3, 4)))])
    assert new.routes[1].server_port == 22 and new.routes[1].upstream.balancer() is inline


def test_load_order_new_last_changed_in_place_and_reordered_when_told():
    old = table()
    new = old.updated([("stream_routes", "r3", route("r3")),
                       ("stream_routes", "r1", route("r1", server_port=11)),
                       ("stream_routes", "r2", None)])
    assert new.route_ids() == ["r1", "r3"] and new.routes[0].server_port == 11
    again = new.updated([("stream_routes", None, ["r3", "r1", "gone"])])
    assert again.route_ids() == ["r3", "r1"]
    assert again.match("127.0.0.1", 11, "127.0.0.1").id == "r3"  # first in load order wins


def test_health_follows_only_the_named_upstreams():
    checked = upstream("u1", 1, 2, checks=CHECKS)
    health = HealthCheckers()  # not started: no probes
    old = RouteTable([], [checked, upstream("u2", 5, 6, checks=CHECKS)])
    health.sync(old)
    state = old.upstreams["u1"].health
    assert state is not None and set(health.checkers) == {"/apisix/upstreams/u1",
                                                          "/apisix/upstreams/u2"}
    state.unhealthy.add("127.0.0.1:1")
    new = old.updated([("upstreams", "u1", dict(checked, desc="x"))])
    health.sync(new, {"/apisix/upstreams/u1"})
    assert new.upstreams["u1"].health is state and "127.0.0.1:1" in state.unhealthy
    gone = new.updated([("upstreams", "u2", None)])
    health.sync(gone, {"/apisix/upstreams/u2"})
    assert set(health.checkers) == {"/apisix/upstreams/u1"}


# -- updates against fresh builds ------------------------------------------------------------

IDS = ["a", "b", "c", "d"]
change = st.tuples(st.sampled_from(["upstreams", "stream_routes"]), st.sampled_from(IDS),
                   st.one_of(st.none(), st.integers(1, 4)))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(change, max_size=6), max_size=6), st.integers(0, 1000))
def test_updates_give_the_table_a_fresh_build_gives(groups, seed):
    """A store modelled as ordered dicts (as FileStore and EtcdStore keep theirs):
    after every group, the updated table and one built from the store agree on
    load order, upstreams and which route each connection matches."""
    rng = random.Random(seed)
    store = {"upstreams": {}, "stream_routes": {}}
    current = RouteTable()
    for group in groups:
        changes = []
        for kind, id_, version in group:
            if version is None:
                store[kind].pop(id_, None)
                changes.append((kind, id_, None))
                continue
            value = (upstream(id_, version, 9) if kind == "upstreams" else
                     route(id_, server_port=version, upstream_id=rng.choice(IDS)))
            store[kind][id_] = value
            changes.append((kind, id_, value))
        if rng.random() < 0.2:  # a reload that reorders the routes
            order = list(store["stream_routes"])
            rng.shuffle(order)
            store["stream_routes"] = {i: store["stream_routes"][i] for i in order}
            changes.append(("stream_routes", None, order))
        current = current.updated(changes)
        fresh = RouteTable(list(store["stream_routes"].values()),
                           list(store["upstreams"].values()))
        assert current.route_ids() == fresh.route_ids()
        assert {k: u.nodes for k, u in current.upstreams.items()} == \
            {k: u.nodes for k, u in fresh.upstreams.items()}
        for port in range(1, 5):
            got, want = (t.match("127.0.0.1", port, "127.0.0.1") for t in (current, fresh))
            assert (got and got.id) == (want and want.id)
            if got:
                (up_c, err_c), (up_f, err_f) = current.upstream_for(got), fresh.upstream_for(want)
                assert err_c == err_f and (up_c and up_c.nodes) == (up_f and up_f.nodes)
