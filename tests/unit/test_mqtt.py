"""gproxy.protocols.mqtt against docs/apisix-behaviour.md §1-2 (APISIX mqtt-proxy preread).

Every packet comes from tests/packets.py, never from gproxy.  Valid packets
are fed whole, byte by byte and in seeded random splits (STYLE.md habit 2);
Hypothesis checks that, whatever the bytes, a prefix only ever gives "need
more" (None), a ConnectPacket or MalformedPacket, and that the verdict for a
prefix never changes once given.
"""

import random
from collections import namedtuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gproxy.errors import MalformedPacket
from gproxy.protocols.mqtt import DEFAULT_MAX_PACKET, ConnectPacket, check_protocol, parse_connect
from tests import packets as P

FUZZ = settings(max_examples=400, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])

HEADER_ERROR = ("failed to parse the msg header: "
                "Received unexpected MQTT packet type+flags: %d")

# -- valid packets -----------------------------------------------------------

Case = namedtuple("Case", "id data level name client_id max_packet")

BIG_PROPS = P.prop_user("k" * 60, "v" * 80)              # 145 B: props length takes 2 varint bytes
HUGE_PROPS = P.prop_user("region", "eu-" * 6000)          # > 16383 B: 3 varint bytes

SHAPES = [
    ("empty-id", dict(client_id=b"")),
    ("short-id", dict(client_id=b"foo")),
    ("long-id", dict(client_id=b"sensor-" + b"7" * 93)),   # 100 B, remaining length still 1 byte
    ("id-over-127", dict(client_id=b"x" * 200)),           # remaining length takes 2 varint bytes
    ("binary-id", dict(client_id=b"\x00\xff\xfe:\x80 id")),  # raw bytes, no UTF-8 check (§1 step 6)
    ("will-user-pass", dict(client_id=b"dev-42", will_topic="status/dev-42",
                            will_payload=b"\x00offline", will_qos=1, will_retain=True,
                            username="alice", password=b"s3cr\x00t", clean_session=False,
                            keepalive=0xFFFF)),
]

V5_SHAPES = [
    ("v5-session-expiry", dict(client_id=b"clint-111", props=P.prop_session_expiry(3600))),
    ("v5-user-props", dict(client_id=b"u1", props=P.prop_user("a", "b") + P.prop_user("c", "d")
                           + P.prop_receive_maximum(10))),
    ("v5-props-2-byte-len", dict(client_id=b"big-props", props=BIG_PROPS)),
    ("v5-all", dict(client_id=b"dev-5", props=P.prop_session_expiry(0), will_topic="lwt",
                    will_payload=b"bye", will_props=P.prop_user("x", "y"),
                    username="bob", password="pw")),
]


def _cases():
    cases = []
    for level in (3, 4, 5):
        for name, kw in SHAPES:
            cases.append(Case("L%d-%s" % (level, name), P.connect(level=level, **kw), level,
                              P.PROTOCOLS[level], kw["client_id"], DEFAULT_MAX_PACKET))
    for name, kw in V5_SHAPES:
        cases.append(Case(name, P.connect_v5(**kw), 5, b"MQTT", kw["client_id"],
                          DEFAULT_MAX_PACKET))
    cases.append(Case("v5-props-3-byte-len", P.connect_v5(b"huge", props=HUGE_PROPS), 5,
                      b"MQTT", b"huge", 1 << 16))
    cases.append(Case("L4-id-3-byte-remaining-len", P.connect_v311(b"i" * 20000), 4,
                      b"MQTT", b"i" * 20000, 1 << 16))
    for name, (data, level, client_id, _) in P.SPEC_VECTORS.items():
        cases.append(Case("spec-" + name, data, level, b"MQTT", client_id, DEFAULT_MAX_PACKET))
    return cases


CASES = _cases()


def _parse(data, case):
    return parse_connect(data, max_packet=case.max_packet)


def assert_connect(pkt, case):
    assert isinstance(pkt, ConnectPacket), (pkt, P.hexdump(case.data[:64]))
    assert pkt.protocol_name == case.name
    assert pkt.protocol_level == case.level
    assert pkt.client_id == case.client_id
    assert pkt.length == len(case.data)


def test_shapes_have_the_header_sizes_they_claim():
    by_id = {c.id: c.data for c in CASES}
    # byte 1 is the first remaining-length byte: continuation bit set means 2+ bytes
    assert by_id["L4-long-id"][1] < 0x80
    assert by_id["L3-id-over-127"][1] & 0x80 and not by_id["L3-id-over-127"][2] & 0x80
    assert by_id["L4-id-3-byte-remaining-len"][2] & 0x80
    v5 = by_id["v5-props-2-byte-len"]
    props_at = 3 + 6 + 1 + 3                      # 2-byte remaining length here
    assert v5[props_at] & 0x80 and not v5[props_at + 1] & 0x80
    huge = by_id["v5-props-3-byte-len"]
    props_at = 4 + 6 + 1 + 3                      # 3-byte remaining length
    assert huge[props_at] & 0x80 and huge[props_at + 1] & 0x80
    assert not huge[props_at + 2] & 0x80


@pytest.mark.parametrize("name", list(P.SPEC_VECTORS))
def test_builder_reproduces_spec_vectors(name):
    data, level, client_id, remaining = P.SPEC_VECTORS[name]
    props = P.prop_session_expiry(3600) if name == "C5-props" else b""
    P.assert_packet(P.connect(client_id, level, props=props), data, name)
    assert data[1] == remaining == len(data) - 2


@pytest.mark.parametrize("name", list(P.SPEC_VECTORS))
def test_spec_vectors_parse(name):
    data, level, client_id, remaining = P.SPEC_VECTORS[name]
    pkt = parse_connect(data)
    assert (pkt.protocol_name, pkt.protocol_level, pkt.client_id) == (b"MQTT", level, client_id)
    assert pkt.length == 2 + remaining  # §1.1: expect_len == packet_len for all six


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_whole(case):
    assert_connect(_parse(case.data, case), case)
    assert_connect(_parse(bytearray(case.data), case), case)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_byte_by_byte(case):
    buf = bytearray()
    for byte in case.data[:-1]:
        buf.append(byte)
        assert _parse(buf, case) is None, "need-more expected at %d bytes" % len(buf)
    buf.append(case.data[-1])
    assert_connect(_parse(buf, case), case)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_random_splits(case, seed):
    rng = random.Random("%s/%d" % (case.id, seed))
    size = len(case.data)
    cuts = sorted(rng.sample(range(1, size), min(size - 1, rng.randint(1, 8))))
    buf = bytearray()
    for start, end in zip([0] + cuts, cuts + [size]):
        assert _parse(buf, case) is None
        buf += case.data[start:end]
    assert_connect(_parse(buf, case), case)


TRAILERS = {
    "publish": P.publish("a/b", b"hello"),
    "publish-qos1-pingreq": P.publish("t", b"x" * 300, qos=1, packet_id=7) + P.pingreq(),
    "disconnect": P.disconnect(),
    "second-connect": P.C4_FOO,
}


@pytest.mark.parametrize("trailer", list(TRAILERS))
@pytest.mark.parametrize("case", CASES[::3] + CASES[-6:], ids=lambda c: c.id)
def test_bytes_after_the_packet_are_ignored(case, trailer):
    data = case.data + TRAILERS[trailer]
    assert_connect(_parse(data, case), case)  # length excludes the trailer
    rng = random.Random(case.id + trailer)
    buf = bytearray()
    while len(buf) < len(data):
        buf += data[len(buf):len(buf) + rng.randint(1, 40)]
        pkt = _parse(buf, case)
        if len(buf) < len(case.data):
            assert pkt is None
        else:
            assert_connect(pkt, case)


# -- what APISIX skips or does not check --------------------------------------

@pytest.mark.parametrize("first", range(16, 33))
def test_first_byte_16_to_32_accepted(first):
    """Any CONNECT flags nibble, and 0x20 (CONNACK) too: APISIX's check is 16..32."""
    pkt = parse_connect(P.connect_v311(b"foo", first_byte=first))
    assert pkt.client_id == b"foo" and pkt.length == 17


def test_connack_first_byte_accepted_like_apisix():
    assert parse_connect(b"\x20" + P.C4_FOO[1:]).client_id == b"foo"


def test_connect_flags_and_keepalive_are_skipped_unread():
    body = P.encode_string("MQTT") + b"\x04\xff\xff\xff" + P.encode_string("abc")
    assert parse_connect(P.packet(0x10, body)).client_id == b"abc"


@pytest.mark.parametrize("keepalive", [0, 1, 60, 0xFFFF])
@pytest.mark.parametrize("level", [3, 4, 5])
def test_keep_alive_is_read_for_the_idle_timeout(level, keepalive):
    pkt = parse_connect(P.connect(b"ka", level=level, keepalive=keepalive))
    assert (pkt.client_id, pkt.keep_alive) == (b"ka", keepalive)


def test_a_missing_keep_alive_is_no_error_of_its_own():
    # name + level + flags, then the packet ends: APISIX fails on the client id
    # length, not on the keep alive, and so do we.
    body = P.encode_string("MQTT") + b"\x04\x02"
    with pytest.raises(MalformedPacket, match="client identifier length"):
        parse_connect(P.packet(0x10, body))


def test_payload_after_client_id_is_not_checked():
    body = P.encode_string("MQTT") + b"\x04\x02\x00\x3c" + P.encode_string("abc") + b"junk"
    pkt = parse_connect(P.packet(0x10, body))
    assert (pkt.client_id, pkt.length) == (b"abc", 2 + len(body))


@pytest.mark.parametrize("level", [0, 1, 2, 6, 0x83, 0xFF])
def test_other_levels_have_no_properties(level):
    pkt = parse_connect(P.connect(b"abc", level=level, protocol_name="MQTT"))
    assert (pkt.protocol_level, pkt.client_id) == (level, b"abc")


def test_packet_is_read_by_its_own_level():
    """The same payload bytes give different ids at level 4 and 5 (§1 step 7 note)."""
    tail = b"\x00\x00\x03foo"
    v4 = parse_connect(P.packet(0x10, P.encode_string("MQTT") + b"\x04\x02\x00\x3c" + tail))
    v5 = parse_connect(P.packet(0x10, P.encode_string("MQTT") + b"\x05\x02\x00\x3c" + tail))
    assert v4.client_id == b""     # id length 0x0000; "\x03foo" is ignored payload
    assert v5.client_id == b"foo"  # properties length 0, then id length 0x0003


def test_level5_properties_length_four_continuation_bytes_is_tolerated():
    """Like the remaining length, APISIX stops a varint after four bytes (§1 step 3, 5)."""
    props_len = b"\x80\x80\x80\x80"  # value 0, no terminating byte
    body = P.encode_string("MQTT") + b"\x05\x02\x00\x3c" + props_len + P.encode_string("id")
    assert parse_connect(P.packet(0x10, body)).client_id == b"id"


def test_protocol_name_is_returned_as_sent():
    pkt = parse_connect(P.connect(b"a", level=4, protocol_name="mqtt"))
    assert pkt.protocol_name == b"mqtt"


# -- errors (§2) ---------------------------------------------------------------

@pytest.mark.parametrize("first", [0x00, 0x01, 0x0F, 0x21, 0x30, 0x32, 0x82, 0xC0, 0xE0, 0xFF])
def test_bad_first_byte_rejected_on_one_byte(first):
    with pytest.raises(MalformedPacket) as exc:
        parse_connect(bytes([first]))
    assert str(exc.value) == HEADER_ERROR % first


def test_mmm_rejected_on_first_byte():
    for buf in (b"m", b"mm", b"mmm"):
        with pytest.raises(MalformedPacket) as exc:
            parse_connect(buf)
        assert str(exc.value) == HEADER_ERROR % 109


def test_publish_first_rejected():
    with pytest.raises(MalformedPacket) as exc:
        parse_connect(P.publish("a/b", b"x") + P.C4_FOO)
    assert str(exc.value) == HEADER_ERROR % 0x30


def test_empty_buffer_needs_more():
    assert parse_connect(b"") is None


def _id_len_past_packet_cases():
    head4 = P.encode_string("MQTT") + b"\x04\x02\x00\x3c"
    head5 = P.encode_string("MQTT") + b"\x05\x02\x00\x3c"
    sx = P.properties(P.prop_session_expiry(3600))   # 6 bytes
    cases = [
        # fixed header 2 + name 6 + level/flags/keepalive 4 = 12, id length -> 14; 14 + 10 = 24
        ("v4-short", P.packet(0x10, head4 + b"\x00\x0afoo"), 24, 17),
        # 2 + 10 + props 6 = 18, id length -> 20; 20 + 0xffff
        ("v5-props", P.packet(0x10, head5 + sx + b"\xff\xffabc"), 20 + 0xFFFF, 2 + 10 + 6 + 5),
        # remaining length 212 takes 2 bytes: 3 + 10 + 2 = 15; one byte short of the packet
        ("over-127-by-one", P.packet(0x10, head4 + b"\x00\xc9" + b"x" * 200), 15 + 201, 215),
        ("v3", P.packet(0x10, P.encode_string("MQIsdp") + b"\x03\x02\x00\x3c\x00\x05ab"),
         16 + 5, 18),
    ]
    return [pytest.param(*case[1:], id=case[0]) for case in cases]


@pytest.mark.parametrize("data,expect,got", _id_len_past_packet_cases())
def test_client_id_past_packet(data, expect, got):
    assert len(data) == got
    for extra in (b"", P.publish("t", b"y" * 64)):   # "got" is the packet, not the buffer
        buf = data + extra
        assert all(parse_connect(buf[:i]) is None for i in range(len(data)))
        with pytest.raises(MalformedPacket) as exc:
            parse_connect(buf)
        assert str(exc.value) == (
            "failed to parse mqtt request, expect len: %d but got %d" % (expect, got))


CUT_SHORT = {
    "no-variable-header": b"",
    "half-name-length": b"\x00",
    "name-clamped-to-nothing": b"\x00\x04",
    "name-clamped": b"\x00\x04MQ",
    "no-level": b"\x00\x04MQTT",
    "huge-name-length": b"\xff\xffMQTT\x04\x02\x00\x3c\x00\x00",
    "flags-past-end": b"\x00\x04MQTT\x04",
    "no-id-length": b"\x00\x04MQTT\x04\x02\x00\x3c",
    "half-id-length": b"\x00\x04MQTT\x04\x02\x00\x3c\x00",
    "v5-no-props-length": b"\x00\x04MQTT\x05\x02\x00\x3c",
    "v5-props-length-continues": b"\x00\x04MQTT\x05\x02\x00\x3c\x80",
    "v5-props-past-end": b"\x00\x04MQTT\x05\x02\x00\x3c\x05\x11\x00",
    "v5-no-id-length": b"\x00\x04MQTT\x05\x02\x00\x3c\x00",
}


@pytest.mark.parametrize("name", list(CUT_SHORT))
def test_cut_short_inside_fields(name):
    """Where APISIX's Lua hits nil arithmetic, gproxy says "malformed" (§2)."""
    data = P.packet(0x10, CUT_SHORT[name])
    for i in range(len(data)):  # no verdict before the whole packet is in
        assert parse_connect(data[:i]) is None
    for extra in (b"", P.pingreq()):
        with pytest.raises(MalformedPacket) as exc:
            parse_connect(data + extra)
        assert exc.value.reason == "malformed"
        assert not str(exc.value).startswith(("expect protocol", "failed to parse mqtt request"))


def test_remaining_length_with_fourth_continuation_bit():
    assert parse_connect(b"\x10\x80\x80\x80") is None
    for buf in (b"\x10\x80\x80\x80\x80", b"\x10\xff\xff\xff\xff\x01" + b"\x00" * 20):
        with pytest.raises(MalformedPacket) as exc:
            parse_connect(buf)
        assert exc.value.reason == "malformed"


def test_largest_remaining_length_is_only_too_large():
    with pytest.raises(MalformedPacket) as exc:
        parse_connect(b"\x10\xff\xff\xff\x7f")
    assert exc.value.reason == "too_large"
    assert parse_connect(b"\x10\xff\xff\xff\x7f", max_packet=P.VARINT_MAX + 5) is None


def _sized_connect(total):
    data = P.connect_v311(b"x" * (total - 15))  # 3-byte fixed header + 12
    assert len(data) == total
    return data


def test_packet_of_exactly_max_packet_is_accepted():
    data = _sized_connect(DEFAULT_MAX_PACKET)
    assert parse_connect(data[:3]) is None
    assert parse_connect(data).length == DEFAULT_MAX_PACKET


def test_too_large_raised_from_header_alone():
    data = _sized_connect(DEFAULT_MAX_PACKET + 1)
    assert parse_connect(data[:2]) is None  # remaining length not complete yet
    with pytest.raises(MalformedPacket) as exc:
        parse_connect(data[:3])
    assert exc.value.reason == "too_large"
    assert "preread buffer full" in str(exc.value)


def test_too_large_with_custom_limit():
    assert parse_connect(P.C4_FOO, max_packet=17).length == 17
    for i in (2, len(P.C5_PROPS)):
        with pytest.raises(MalformedPacket) as exc:
            parse_connect(P.C5_PROPS[:i], max_packet=20)
        assert exc.value.reason == "too_large"


# -- check_protocol (§1 step 7) -------------------------------------------------

def _check_error(data, name, level):
    with pytest.raises(MalformedPacket) as exc:
        check_protocol(parse_connect(data), name, level)
    return str(exc.value), exc.value.reason


@pytest.mark.parametrize("data,name,level", [
    (P.C4_FOO, "MQTT", 4), (P.C5_PROPS, "MQTT", 5), (P.connect_v31(b"old"), "MQIsdp", 3)])
def test_check_protocol_accepts(data, name, level):
    assert check_protocol(parse_connect(data), name, level) is None


def test_name_is_checked_before_level():
    # MQTT 3.1 against the default route: both differ, the name is reported
    assert _check_error(P.connect_v31(b"old"), "MQTT", 4) == (
        "expect protocol name: MQTT, but got MQIsdp", "protocol_name")


def test_name_compare_is_case_sensitive():
    assert _check_error(P.connect(b"a", level=4, protocol_name="mqtt"), "MQTT", 4) == (
        "expect protocol name: MQTT, but got mqtt", "protocol_name")


def test_level5_against_level4_route_parsed_then_rejected():
    data = P.connect_v5(b"dev-1", props=P.prop_user("a", "b") + P.prop_session_expiry(60))
    pkt = parse_connect(data)
    assert (pkt.client_id, pkt.protocol_level, pkt.length) == (b"dev-1", 5, len(data))
    assert _check_error(data, "MQTT", 4) == (
        "expect protocol level: 4, but got 5", "protocol_level")


def test_level4_against_level5_route_rejected():
    assert _check_error(P.C4_FOO, "MQTT", 5) == (
        "expect protocol level: 5, but got 4", "protocol_level")


# -- Hypothesis -----------------------------------------------------------------

def verdicts(data, max_packet=DEFAULT_MAX_PACKET):
    """Feed every prefix of ``data``; check the contract; return the final verdict.

    Only None, a ConnectPacket or MalformedPacket may come out (anything else
    propagates and fails the test), and once a prefix gets a packet or an error
    every longer prefix gets the same one.
    """
    verdict = None
    for i in range(len(data) + 1):
        try:
            res = parse_connect(data[:i], max_packet)
        except MalformedPacket as exc:
            outcome = ("error", str(exc), exc.reason)
        else:
            assert res is None or isinstance(res, ConnectPacket), repr(res)
            outcome = None if res is None else ("packet", res)
            if res is not None:
                assert res.length <= min(i, max_packet)
                assert isinstance(res.client_id, bytes)
        if verdict is not None:
            assert outcome == verdict, "prefix %d of\n%s" % (i, P.hexdump(data))
        verdict = outcome
    return verdict


@FUZZ
@given(st.binary(max_size=200), st.sampled_from([DEFAULT_MAX_PACKET, 64, 16, 3]))
def test_fuzz_arbitrary_bytes(data, max_packet):
    verdicts(data, max_packet)


@st.composite
def framed_bodies(draw):
    """A plausible first byte and a remaining length that matches a random body."""
    body = draw(st.binary(max_size=120))
    first = draw(st.integers(16, 32))
    return P.packet(first, body) + draw(st.binary(max_size=10))


@FUZZ
@given(framed_bodies())
def test_fuzz_framed_random_bodies(data):
    verdicts(data)


@st.composite
def valid_connects(draw):
    level = draw(st.sampled_from([3, 4, 5]))
    client_id = draw(st.binary(max_size=150))
    kw = {}
    if draw(st.booleans()):
        kw.update(will_topic=draw(st.text(max_size=20)), will_payload=draw(st.binary(max_size=30)))
    if draw(st.booleans()):
        kw["username"] = draw(st.text(max_size=20))
    if draw(st.booleans()):
        kw["password"] = draw(st.binary(max_size=20))
    if level == 5:
        props = draw(st.lists(st.one_of(
            st.integers(0, 2**32 - 1).map(P.prop_session_expiry),
            st.integers(1, 65535).map(P.prop_receive_maximum),
            st.tuples(st.text(max_size=40), st.text(max_size=90)).map(lambda kv: P.prop_user(*kv)),
        ), max_size=4))
        kw["props"] = b"".join(props)
    first = draw(st.integers(16, 32))
    return level, client_id, P.connect(client_id, level, first_byte=first, **kw)


@FUZZ
@given(valid_connects(), st.binary(max_size=30))
def test_fuzz_valid_connects_round_trip(connect, trailer):
    level, client_id, data = connect
    verdict = verdicts(data + trailer)
    assert verdict[0] == "packet", verdict
    pkt = verdict[1]
    assert (pkt.protocol_name, pkt.protocol_level) == (P.PROTOCOLS[level], level)
    assert (pkt.client_id, pkt.length) == (client_id, len(data))


MUTATIONS = st.lists(st.tuples(
    st.sampled_from(["set", "insert", "delete", "truncate"]),
    st.integers(0, 400), st.integers(0, 255)), min_size=1, max_size=4)


def _mutate(data, ops):
    buf = bytearray(data)
    for op, pos, value in ops:
        pos = pos % (len(buf) + 1)
        if op == "set" and pos < len(buf):
            buf[pos] = value
        elif op == "insert":
            buf[pos:pos] = bytes([value])
        elif op == "delete":
            del buf[pos:pos + 1 + value % 4]
        elif op == "truncate":
            del buf[pos:]
    return bytes(buf)


@FUZZ
@given(valid_connects(), MUTATIONS)
def test_fuzz_mutated_connects(connect, ops):
    verdicts(_mutate(connect[2], ops))
