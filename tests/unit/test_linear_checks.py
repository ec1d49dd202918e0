"""The Admin checks cost time linear in their input, and every field has a bound.

Hostile values that held the hub for seconds (a backtracking PEM or IPv6
pattern, pairwise unique-item checks, a ring of 16 million points, a retry
walk of a billion round-robin steps) are fed at their largest size.  Each
check must answer the way APISIX does for the values APISIX accepts; the
time bounds here are a thousand times what the linear code needs, so they
fail only when the cost is super-linear again (the old code ran for minutes
on these inputs), never because the machine is busy.
"""

import json
import random
import time

import pytest
from hypothesis import given, settings, strategies as st

from gproxy.errors import SchemaError
from gproxy.model import jsontext
from gproxy.model.balancer import (CHASH_POINTS_PER_WEIGHT, MAX_RING_POINTS, Balancer,
                                   ChashRing, Node, RoundRobin)
from gproxy.model.resources import STREAM_ROUTE_SCHEMA, check_stream_route, check_upstream
from gproxy.model.schema import matches, pcre_to_re2, validate
from gproxy.model.ssls import CERT, check_ssl, pem_blocks, pem_sections

LIMIT = 1.0  # seconds; the linear checks below take about a millisecond


def timed(func, *args):
    start = time.perf_counter()
    try:
        result = func(*args)
    except SchemaError as exc:
        result = exc
    return result, time.perf_counter() - start


# -- patterns ----------------------------------------------------------------------

def test_pem_with_64_kib_of_spaces_is_refused_at_once():
    cert = "-----BEGIN CERTIFICATE-----" + " " * (CERT["maxLength"] - 27)
    conf = {"id": "1", "sni": "a.example", "cert": cert, "key": "k" * 64}
    err, took = timed(check_ssl, conf)
    assert str(err) == "failed to parse cert: PEM_read_bio_X509_AUX() failed"
    assert took < LIMIT, "a 64 KiB cert took %.2fs to check" % took


def test_many_begin_markers_are_one_pass():
    text = ("-----BEGIN CERTIFICATE-----" + " " * 40) * 1500
    result, took = timed(pem_sections, text)
    assert result == [] and took < LIMIT


PEM_ALPHABET = ["-----BEGIN ", "-----END ", "CERTIFICATE", "KEY", "-----", " ", "\n",
                "AB", "=", "-", "x", "Q9", "\t", "A", "\u2003"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(PEM_ALPHABET), max_size=30))
def test_pem_parser_finds_what_the_old_pattern_found(parts):
    """The hand parser against the backtracking pattern it replaces (kept here
    as the oracle, on inputs small enough for it)."""
    import re
    old = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----\s*([A-Za-z0-9+/=\s]*?)\s*-----END \1-----")
    text = "".join(parts)
    assert [(label, body.strip()) for label, body in pem_sections(text)] == \
        [(label, body.strip()) for label, body in old.findall(text)]


def test_pem_blocks_still_decode_a_real_block():
    text = "junk\n-----BEGIN CERTIFICATE-----\nMAMCAQE=\n-----END CERTIFICATE-----\n"
    assert pem_blocks(text, ("CERTIFICATE",)) == [b"\x30\x03\x02\x01\x01"]


IPV6_PATTERN = r"^[0-9a-fA-F:.]*:[0-9a-fA-F:.]*(%.+)?$"


def test_ipv6_pattern_is_linear_on_64_kib():
    """Python's re took 1.7 s on 8,000 colons and grows with the square."""
    result, took = timed(matches, IPV6_PATTERN, ":" * 65536 + "x")
    assert result is False and took < LIMIT


def test_remote_addr_has_a_length_bound():
    err, took = timed(check_stream_route, {"id": "1", "remote_addr": ":" * 65536 + "x"})
    assert str(err) == ('invalid configuration: property "remote_addr" validation failed: '
                        "string too long, expected at most 128, got 65537")
    assert took < LIMIT


@pytest.mark.parametrize("value, ok", [
    ("abc", True),
    ("abc\n", True),        # PCRE's $ also matches before a final newline
    ("abc\n\n", False),
    ("a b", False),
    ("a\x0bb", False),      # PCRE's \s has the vertical tab; RE2's has not
    ("a\u00a0b", True),     # bytes, no Unicode classes: NBSP is not PCRE's \s
    ("\ud800x", True),      # a lone surrogate from JSON's \ud800: bytes, not an error
])
def test_label_pattern_means_what_pcre_means(value, ok):
    err = validate(STREAM_ROUTE_SCHEMA, {"labels": {"k": value}})
    assert (err is None) is ok, err


def test_unicode_digits_are_not_pcre_digits():
    # Python's \d took them; PCRE's (and so APISIX's) does not
    err = validate(STREAM_ROUTE_SCHEMA, {"remote_addr": "\u0661\u0662\u0667.0.0.1"})
    assert err == 'property "remote_addr" validation failed: object matches none of the requireds'


def test_translation_keeps_classes_and_escapes():
    assert pcre_to_re2(r"^\*$|^[a-z$\]]+\$$") == r"^\*(?:\n?$)|^[a-z$\]]+\$(?:\n?$)"
    assert pcre_to_re2(r"^\S+$") == r"^[^\t\n\x0b\f\r ]+(?:\n?$)"


# -- unique items --------------------------------------------------------------------

UNIQUE = {"type": "array", "uniqueItems": True}


class Counted(str):
    """A string that counts how often it is compared for equality."""

    compared = 0

    def __eq__(self, other):
        Counted.compared += 1
        return str.__eq__(self, other)

    __hash__ = str.__hash__


def test_unique_items_is_linear():
    """Counted, not timed: comparing every pair made 12.5 million comparisons here."""
    items = [Counted("u%d" % i) for i in range(5000)] + [Counted("u5")]
    Counted.compared = 0
    err = validate(UNIQUE, items)
    assert err == "expected unique items but items 6 and 5001 are equal"
    assert Counted.compared < 10 * len(items)


@pytest.mark.parametrize("items, pair", [
    ([1, 2, 1.0], (1, 3)),            # Lua numbers: 1 == 1.0
    ([True, 1], None),                # a boolean is not a number
    ([{}, 3, []], (1, 3)),            # one empty table in Lua
    ([{"a": [1]}, {"a": [1.0]}], (1, 2)),
    ([[1, 2], [2, 1]], None),
    ([{"a": 1}, 5, {"b": 1}, 5, {"a": 1}], (2, 4)),  # scalars are checked first, as Lua
])
def test_unique_items_reports_what_jsonschema_lua_reports(items, pair):
    err = validate(UNIQUE, items)
    want = None if pair is None else "expected unique items but items %d and %d are equal" % pair
    assert err == want


# -- bounds ----------------------------------------------------------------------------

@pytest.mark.parametrize("conf, message", [
    ({"id": "1", "labels": {"k%d" % i: "v" for i in range(257)}},
     'property "labels" validation failed: expect object to have at most 256 properties'),
    ({"id": "1", "labels": {"k" * 257: "v"}},
     'property "labels" validation failed: property name "%s" validation failed: '
     "string too long, expected at most 256, got 257" % ("k" * 64)),
    ({"id": "1", "sni": "a" * 257},
     'property "sni" validation failed: string too long, expected at most 256, got 257'),
    ({"id": "1", "upstream": {"nodes": [{"host": "h", "port": 1, "weight": 1}] * 1001}},
     'property "upstream" validation failed: property "nodes" validation failed: '
     "object matches none of the requireds"),
    ({"id": "1", "plugins": {"mqtt-proxy": {"protocol_level": 4, "protocol_name": "M" * 257}}},
     None),
])
def test_fields_have_bounds(conf, message):
    err = validate(STREAM_ROUTE_SCHEMA, conf)
    if message is None:  # a plugin's own schema: checked by check_plugins
        with pytest.raises(SchemaError, match="string too long, expected at most 256"):
            check_stream_route(conf)
    else:
        assert err == message


# -- rings -------------------------------------------------------------------------------

def chash(*weights, priority=0):
    return {"id": "1", "type": "chash", "key": "remote_addr",
            "nodes": [{"host": "10.0.0.%d" % i, "port": 1883, "weight": w, "priority": priority}
                      for i, w in enumerate(weights, 1)]}


def test_a_huge_weight_beside_a_small_one_is_refused_naming_nodes():
    err, took = timed(check_upstream, chash(100000, 1))
    assert str(err) == (
        'invalid configuration: property "nodes" validation failed: the weights make a '
        "chash ring of 16000160 points, expected at most %d (160 points per unit of weight, "
        "once the weights are divided by their greatest common divisor)" % MAX_RING_POINTS)
    assert took < LIMIT


def test_an_inline_upstream_names_its_field():
    with pytest.raises(SchemaError, match='^invalid configuration: property "upstream" '
                                          'validation failed: property "nodes" validation'):
        check_stream_route({"id": "1", "upstream": chash(100000, 1)})


@pytest.mark.parametrize("weights", [(100000,), (100000, 100000), (5000, 10000, 15000),
                                     (1023, 1)])
def test_big_weights_with_a_small_ring_are_accepted(weights):
    check_upstream(chash(*weights))  # divided by their gcd, as resty.chash does


def test_roundrobin_takes_any_weight():
    conf = chash(10 ** 9, 1)
    conf["type"] = "roundrobin"
    check_upstream(conf)


def test_ring_is_built_in_steps_with_pauses():
    nodes = [Node("10.0.0.%d" % i, 1883, 1) for i in range(1, 101)]
    pauses = []
    ring = ChashRing(nodes, pause=lambda: pauses.append(1))
    assert len(ring) == 100 * CHASH_POINTS_PER_WEIGHT
    assert len(pauses) >= len(ring) // 512  # at most 512 points between two pauses
    assert [ring.pick(b"k%d" % i) for i in range(500)] == \
        [ChashRing(nodes).pick(b"k%d" % i) for i in range(500)]


# -- round robin retries -------------------------------------------------------------------

class NaiveRoundRobin(RoundRobin):
    """resty.roundrobin's walk, one step at a time with no step limit: the oracle."""

    def pick(self, key=None, tried=()):
        if all(node in tried for node in self.nodes):
            return None
        reachable = [n for n, w in zip(self.nodes, self._weights)
                     if n not in tried and (w > 0 or self._max == 0)]
        if not reachable:
            return None
        while True:
            node = self._next()
            if node not in tried:
                return node


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=6), st.integers(0, 10 ** 6),
       st.lists(st.tuples(st.booleans(), st.integers(0, 63)), max_size=25))
def test_roundrobin_skip_matches_the_step_by_step_walk(weights, seed, picks):
    nodes = [Node("10.0.0.%d" % i, 1883, w) for i, w in enumerate(weights, 1)]
    fast = RoundRobin(nodes, rng=random.Random(seed))
    slow = NaiveRoundRobin(nodes, rng=random.Random(seed))
    for with_tried, mask in picks:
        tried = {n for i, n in enumerate(nodes) if with_tried and mask >> i & 1}
        assert fast.pick(None, tried) == slow.pick(None, tried)
        assert (fast._index, fast._current) == (slow._index, slow._current)


def test_a_retry_beside_a_billion_weight_is_one_pass():
    nodes = [Node("10.0.0.1", 1883, 10 ** 9), Node("10.0.0.2", 1883, 1)]
    balancer = Balancer(nodes, "roundrobin")
    start = time.perf_counter()
    got = list(balancer.candidates(b"", 2))
    assert sorted(n.host for n in got) == ["10.0.0.1", "10.0.0.2"]
    assert time.perf_counter() - start < LIMIT


# -- JSON text from outside ----------------------------------------------------------------

def test_a_mebibyte_of_small_values_is_refused_before_decoding():
    text = "[" + ",".join(["{}"] * 350000) + "]"
    assert len(text) > 1000000
    err, took = timed(jsontext_loads, text)
    assert str(err) == "Found too many values (more than 16384)"
    assert took < LIMIT


def test_an_upstream_of_a_thousand_nodes_decodes():
    nodes = [{"host": "10.0.%d.%d" % (i // 250, i % 250), "port": 1883, "weight": 1,
              "priority": 0} for i in range(1000)]
    body = {"id": "1", "nodes": nodes}
    assert jsontext.loads(json.dumps(body)) == body


@pytest.mark.parametrize("depth, ok", [(64, True), (65, False), (5000, False)])
def test_nesting_is_bounded(depth, ok):
    text = '{"a":' * depth + "1" + "}" * depth
    result, _ = timed(jsontext_loads, text)
    if ok:
        assert not isinstance(result, Exception)
    else:
        assert str(result) == "Found too many nested data structures (more than 64)"


@pytest.mark.parametrize("text, message", [
    ('{"weight": %s}' % ("9" * 5000), "Exceeds the limit (4300 digits) for integer string "
                                      "conversion: value has 5000 digits"),
    ('{"a": 1,}', "Expected object key string but found invalid token at character 9"),
])
def test_bad_texts_are_json_errors(text, message):
    with pytest.raises(jsontext.JsonError) as err:
        jsontext.loads(text)
    assert str(err.value) == message


def jsontext_loads(text):
    try:
        return jsontext.loads(text)
    except jsontext.JsonError as exc:
        return exc


def test_a_long_string_is_encoded_in_parts_to_the_same_text():
    text = 'ab"c\\\u2028\x00\u00e9\U0001f600' * 30000
    pauses = []
    out = jsontext.dumps_string(text, lambda: pauses.append(1), ensure_ascii=False)
    assert out == json.dumps(text, ensure_ascii=False) and len(pauses) >= 4
