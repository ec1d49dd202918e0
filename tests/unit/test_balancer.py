"""gproxy.model.balancer against docs/apisix-behaviour.md §5.2-5.4.

The chash ring is checked against a reference model written here from the
spec's words (CRC-32 of ``id || prev`` as 4 little-endian bytes, 160 points per
gcd-reduced weight, first point >= CRC32(key), wrap around), not against the
code.  Keys with a chosen CRC-32 are forged (CRC-32 can be steered by any four
appended bytes) so ring boundaries are hit exactly.
"""

import bisect
import math
import random
import struct
import zlib
from collections import Counter

import pytest

from gproxy.model.balancer import Balancer, ChashRing, KetamaRing, Node, RoundRobin

A = Node("0.0.0.0", 1995)
B = Node("127.0.0.1", 1995)


def brokers(count, **kw):
    return [Node("10.0.0.%d" % i, 1883, **kw) for i in range(1, count + 1)]


def keys(count, prefix=b"client-"):
    return [prefix + b"%d" % i for i in range(count)]


# -- reference model of resty.chash (§5.3) ------------------------------------

def ring_id(addr):
    return addr.replace(":", "\0").encode()


def model_points(addr, count):
    ident, prev, out = ring_id(addr), 0, []
    for _ in range(count):
        prev = zlib.crc32(ident + struct.pack("<I", prev))
        out.append(prev)
    return out


def model_ring(weighted):
    """Sorted ``(hash, addr)`` points for ``[(addr, weight), ...]``."""
    gcd = 0
    for _, weight in weighted:
        gcd = math.gcd(gcd, weight)
    gcd = gcd or 1
    return sorted((h, addr) for addr, weight in weighted
                  for h in model_points(addr, 160 * (weight // gcd)))


def model_walk(ring, key):
    """Distinct owners in ring order from the first point >= CRC32(key)."""
    start = bisect.bisect_left([h for h, _ in ring], zlib.crc32(key))
    order = []
    for step in range(len(ring)):
        owner = ring[(start + step) % len(ring)][1]
        if owner not in order:
            order.append(owner)
    return order


def _crc_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0xEDB88320 if c & 1 else c >> 1
        table.append(c)
    return table


CRC_TABLE = _crc_table()
CRC_INDEX_BY_TOP_BYTE = {t >> 24: i for i, t in enumerate(CRC_TABLE)}


def key_with_crc(target, prefix=b"key-"):
    """``prefix`` plus four bytes whose ``zlib.crc32`` is ``target``.

    Walk the CRC register back four steps from ``target`` to learn which table
    entries the last four bytes must select, then choose the bytes forward.
    """
    want = target ^ 0xFFFFFFFF
    indexes = []
    for _ in range(4):
        i = CRC_INDEX_BY_TOP_BYTE[want >> 24]
        indexes.append(i)
        want = ((want ^ CRC_TABLE[i]) << 8) & 0xFFFFFFFF
    reg = zlib.crc32(prefix) ^ 0xFFFFFFFF
    tail = bytearray()
    for i in reversed(indexes):
        tail.append((reg ^ i) & 0xFF)
        reg = (reg >> 8) ^ CRC_TABLE[i]
    key = prefix + bytes(tail)
    assert zlib.crc32(key) == target
    return key


def test_key_forging_works():
    for target in (0, 1, 0xFFFFFFFF, 0x0C43E9B0, 0xDEADBEEF):
        assert zlib.crc32(key_with_crc(target)) == target


# -- ChashRing ------------------------------------------------------------------

@pytest.mark.parametrize("key,addr", [
    (b"f", "0.0.0.0:1995"),
    (b"g", "127.0.0.1:1995"),
    (b"127.0.0.1", "127.0.0.1:1995"),  # the remote_addr fallback for an empty client id
    (b"foo", "0.0.0.0:1995"),
    (b"clint-111", "127.0.0.1:1995"),
    (b"client-1", "127.0.0.1:1995"),
    (b"client-2", "0.0.0.0:1995"),
])
def test_spec_check_values(key, addr):
    assert ChashRing([A, B]).pick(key).addr == addr
    assert ChashRing([B, A]).pick(key).addr == addr  # node order does not matter
    assert [n.addr for n in Balancer([A, B], "chash").candidates(key, 1)] == [addr]


SPEC_POINTS = {
    "0.0.0.0:1995": (0xBCF991E0, [0x0C43E9B0, 0x65E01CE8, 0x6912BC48]),
    "127.0.0.1:1995": (0xF8AFE9C4, [0xE4A1976A, 0x581D85B1, 0x3C4DD224]),
}


@pytest.mark.parametrize("addr", list(SPEC_POINTS))
def test_model_reproduces_spec_base_and_first_points(addr):
    base, first = SPEC_POINTS[addr]
    assert ring_id(addr) == addr.replace(":", "\x00").encode()
    assert zlib.crc32(ring_id(addr)) == base
    assert model_points(addr, 3) == first
    # CRC32(id || prev) is the running CRC seeded with the base
    assert zlib.crc32(struct.pack("<I", first[0]), base) == first[1]


@pytest.mark.parametrize("addr", list(SPEC_POINTS))
def test_first_points_are_on_the_ring(addr):
    ring = ChashRing([A, B])
    for point in SPEC_POINTS[addr][1]:
        # a key hashing exactly onto a point belongs to that point's node (">=")
        assert ring.pick(key_with_crc(point)).addr == addr


def test_ring_matches_model_at_every_point():
    model = model_ring([(A.addr, 1), (B.addr, 1)])
    assert len(model) == 320
    assert Counter(addr for _, addr in model) == {A.addr: 160, B.addr: 160}
    ring = ChashRing([A, B])
    for i, (point, owner) in enumerate(model):
        assert ring.pick(key_with_crc(point)).addr == owner
        if point < 0xFFFFFFFF:
            after = model[(i + 1) % len(model)][1]
            assert ring.pick(key_with_crc(point + 1)).addr == after


@pytest.mark.parametrize("nodes", [
    [A, B],
    # here the first and the last point have different owners, so wrapping
    # is told apart from "nearest point" or "last point"
    [Node("127.0.0.1", 1883), Node("127.0.0.1", 1885)],
], ids=["spec-nodes", "owners-differ"])
def test_wrap_around_to_first_point(nodes):
    model = model_ring([(n.addr, 1) for n in nodes])
    first_owner, last = model[0][1], model[-1][0]
    ring = ChashRing(nodes)
    for crc in (last + 1, (last + 0xFFFFFFFF) // 2, 0xFFFFFFFF, 0, model[0][0]):
        assert ring.pick(key_with_crc(crc)).addr == first_owner
    assert ring.pick(key_with_crc(last)).addr == model[-1][1]


def test_wrap_around_case_is_meaningful():
    model = model_ring([("127.0.0.1:1883", 1), ("127.0.0.1:1885", 1)])
    assert model[0][1] != model[-1][1]


@pytest.mark.parametrize("weights", [(1, 1), (1, 2, 3), (5, 1, 1, 2)])
def test_lookup_matches_model(weights):
    nodes = [Node("192.168.1.%d" % i, 1883 + i, weight=w) for i, w in enumerate(weights)]
    model = model_ring([(n.addr, n.weight) for n in nodes])
    assert len(model) == 160 * sum(w // math.gcd(*weights) for w in weights)
    ring = ChashRing(nodes)
    rng = random.Random(5)
    for key in keys(1000) + [rng.randbytes(rng.randint(0, 24)) for _ in range(1000)]:
        assert ring.pick(key).addr == model_walk(model, key)[0]


def test_ipv6_node_id_keeps_brackets():
    nodes = [Node("::1", 1883), Node("[fe80::2]", 1883), Node("10.0.0.1", 1883)]
    assert [n.addr for n in nodes] == ["[::1]:1883", "[fe80::2]:1883", "10.0.0.1:1883"]
    model = model_ring([(n.addr, 1) for n in nodes])
    ring = ChashRing(nodes)
    for key in keys(1000):
        assert ring.pick(key).addr == model_walk(model, key)[0]


def test_retry_walks_the_ring_skipping_tried():
    nodes = brokers(4)
    model = model_ring([(n.addr, 1) for n in nodes])
    ring = ChashRing(nodes)
    for key in keys(300):
        tried, order = set(), []
        while (node := ring.pick(key, tried)) is not None:
            assert node not in tried
            tried.add(node)
            order.append(node.addr)
        assert order == model_walk(model, key)
    assert ring.pick(b"k", set(nodes)) is None


def test_retry_two_nodes():
    ring = ChashRing([A, B])
    assert ring.pick(b"f", {A}) == B
    assert ring.pick(b"g", {B}) == A
    assert ring.pick(b"f", {A, B}) is None
    assert ring.pick(b"f", {B}) == A  # tried nodes that are not first change nothing


def test_weights_reduced_by_gcd():
    def picks(weights):
        ring = ChashRing([Node(n.host, n.port, weight=w) for n, w in zip(brokers(2), weights)])
        return [ring.pick(k).addr for k in keys(2000)]

    assert picks((2, 4)) == picks((1, 2))
    assert picks((6, 9)) == picks((2, 3))
    assert picks((7, 7)) == picks((1, 1))
    assert picks((1, 2)) != picks((1, 1))  # weights do matter


def test_equal_weights_keep_spec_check_values():
    ring = ChashRing([Node(A.host, A.port, weight=3), Node(B.host, B.port, weight=3)])
    assert (ring.pick(b"f").addr, ring.pick(b"g").addr) == (A.addr, B.addr)


def test_weight_zero_node_never_chosen():
    live1, dead, live2 = Node("10.0.0.1", 1883), Node("10.0.0.2", 1883, weight=0), \
        Node("10.0.0.3", 1883)
    ring = ChashRing([live1, dead, live2])
    assert dead not in {ring.pick(k) for k in keys(5000)}
    assert ring.pick(b"any", {live1, live2}) is None


def test_all_weights_zero_picks_nothing():
    assert ChashRing(brokers(3, weight=0)).pick(b"k") is None
    assert ChashRing([]).pick(b"k") is None


def test_adding_a_node_moves_about_a_third_of_keys_all_to_it():
    two, three = ChashRing(brokers(2)), ChashRing(brokers(3))
    new = brokers(3)[2]
    sample = keys(5000)
    moved = [k for k in sample if two.pick(k) != three.pick(k)]
    assert all(three.pick(k) == new for k in moved)
    assert 0.2 <= len(moved) / len(sample) <= 0.45


def test_spread_over_four_nodes():
    ring = ChashRing(brokers(4))
    counts = Counter(ring.pick(k) for k in keys(10000))
    assert set(counts) == set(brokers(4))
    assert all(1500 <= c <= 3500 for c in counts.values()), counts


# -- RoundRobin (§5.4) ------------------------------------------------------------

def rr_picks(weights, count, seed=0, tried=()):
    nodes = [Node("10.0.1.%d" % i, 1883, weight=w) for i, w in enumerate(weights, 1)]
    rr = RoundRobin(nodes, rng=random.Random(seed))
    return nodes, [rr.pick(None, tried) for _ in range(count)]


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("weights,count,expected", [
    ((5, 1, 1), 700, (500, 100, 100)),
    ((3, 2, 1), 600, (300, 200, 100)),
    ((4, 2), 300, (200, 100)),           # gcd 2: cycle of 3
    ((1, 1, 1, 1), 400, (100, 100, 100, 100)),
])
def test_roundrobin_proportions_exact(weights, count, expected, seed):
    nodes, picks = rr_picks(weights, count, seed)
    counts = Counter(picks)
    assert tuple(counts[n] for n in nodes) == expected


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("weights", [(5, 1, 1), (3, 2, 1), (1, 4, 2, 7)])
def test_roundrobin_every_full_cycle_has_exact_weights(weights, seed):
    """Any window of one cycle (sum of weights picks) holds each node ``weight`` times."""
    cycle = sum(weights)
    nodes, picks = rr_picks(weights, 3 * cycle, seed)
    for start in range(2 * cycle):
        counts = Counter(picks[start:start + cycle])
        assert tuple(counts[n] for n in nodes) == weights  # no node starved


def test_roundrobin_random_start():
    firsts = {rr_picks((1, 1, 1), 1, seed)[1][0].host for seed in range(60)}
    assert firsts == {"10.0.1.1", "10.0.1.2", "10.0.1.3"}
    assert rr_picks((3, 1, 2), 50, seed=7)[1] == rr_picks((3, 1, 2), 50, seed=7)[1]


def test_roundrobin_skips_tried():
    nodes, _ = rr_picks((1, 1, 1), 0)
    rr = RoundRobin(nodes, rng=random.Random(1))
    assert {rr.pick(None, {nodes[0]}) for _ in range(30)} == {nodes[1], nodes[2]}
    assert {rr.pick(None, {nodes[0], nodes[1]}) for _ in range(30)} == {nodes[2]}
    assert rr.pick(None, set(nodes)) is None
    heavy = RoundRobin([Node("h", 1, weight=50), Node("l", 1, weight=1)], rng=random.Random(2))
    assert heavy.pick(None, {Node("h", 1, weight=50)}) == Node("l", 1, weight=1)


def test_roundrobin_weight_zero_never_chosen():
    for seed in range(20):
        nodes, picks = rr_picks((1, 0, 1), 30, seed)
        assert nodes[1] not in picks, "seed %d: %s" % (seed, [n.host for n in picks[:3]])
        nodes, picks = rr_picks((1, 0, 1), 1, seed, tried={nodes[0], nodes[2]})
        assert picks == [None]
        nodes, picks = rr_picks((2, 1, 1, 0), 400, seed)
        assert tuple(Counter(picks)[n] for n in nodes) == (200, 100, 100, 0)


def test_roundrobin_empty():
    assert RoundRobin([]).pick() is None


# -- KetamaRing (uhashring, opt-in) ---------------------------------------------------

def test_ketama_deterministic():
    nodes = brokers(4)
    one, two, rev = KetamaRing(nodes), KetamaRing(nodes), KetamaRing(nodes[::-1])
    for key in keys(1000):
        assert one.pick(key) == one.pick(key) == two.pick(key) == rev.pick(key)
    assert len({one.pick(k) for k in keys(1000)}) == 4


def test_ketama_skips_tried():
    nodes = brokers(4)
    ring = KetamaRing(nodes)
    for key in keys(200):
        tried = []
        while (node := ring.pick(key, set(tried))) is not None:
            assert node not in tried
            tried.append(node)
        assert sorted(tried, key=lambda n: n.host) == nodes
        assert tried[0] == ring.pick(key)


def test_ketama_weight_zero_never_chosen():
    nodes = brokers(2) + [Node("10.0.0.9", 1883, weight=0)]
    ring = KetamaRing(nodes)
    assert nodes[2] not in {ring.pick(k) for k in keys(2000)}
    assert ring.pick(b"k", set(nodes[:2])) is None
    assert KetamaRing(brokers(2, weight=0)).pick(b"k") is None


def test_balancer_ketama_opt_in():
    nodes = brokers(3)
    ring, bal = KetamaRing(nodes), Balancer(nodes, "chash", ring="ketama")
    for key in keys(200):
        assert next(bal.candidates(key, 1)) == ring.pick(key)


# -- Balancer ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["roundrobin", "chash"])
@pytest.mark.parametrize("tries", [1, 2, 5])
def test_single_node_bypass(kind, tries):
    node = Node("10.9.9.9", 1883)
    assert list(Balancer([node], kind).candidates(b"k", tries)) == [node]


HIGH = [Node("10.1.0.1", 1883, priority=10), Node("10.1.0.2", 1883, priority=10)]
MID = [Node("10.2.0.1", 1883), Node("10.2.0.2", 1883)]
LOW = [Node("10.3.0.1", 1883, priority=-5)]


@pytest.mark.parametrize("kind", ["roundrobin", "chash"])
def test_priority_groups_in_order(kind):
    bal = Balancer(MID + LOW + HIGH, kind)
    for key in keys(100):
        got = list(bal.candidates(key, 5))
        assert set(got[:2]) == set(HIGH)
        assert set(got[2:4]) == set(MID)
        assert got[4:] == LOW


def test_chash_order_within_a_priority_group():
    bal = Balancer(MID + HIGH, "chash")
    for key in keys(200):
        got = list(bal.candidates(key, 4))
        assert got[:2] == [ChashRing(HIGH).pick(key), ChashRing(HIGH).pick(key, set(got[:1]))]
        assert got[2] == ChashRing(MID).pick(key)


@pytest.mark.parametrize("kind", ["roundrobin", "chash"])
def test_tries_limit_and_distinct(kind):
    nodes = HIGH + MID + LOW
    bal = Balancer(nodes, kind)
    for tries in range(0, 8):
        for key in keys(30):
            got = list(bal.candidates(key, tries))
            assert len(got) == min(tries, len(nodes))
            assert len(set(got)) == len(got)
    assert set(bal.candidates(b"k", 5)) == set(nodes)


def test_lower_priority_only_after_all_higher_tried():
    bal = Balancer(HIGH + MID, "roundrobin")
    for _ in range(50):
        assert set(bal.candidates(None, 2)) == set(HIGH)


def test_chash_candidates_follow_the_ring():
    nodes = brokers(4)
    model = model_ring([(n.addr, 1) for n in nodes])
    bal = Balancer(nodes, "chash")
    for key in keys(200):
        assert [n.addr for n in bal.candidates(key, 4)] == model_walk(model, key)
