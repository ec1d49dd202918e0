"""The CONNECT username read (gproxy.protocols.mqtt) and the CONNECT rewrite
(gproxy.protocols.mqttconnect), for MQTT 3.1, 3.1.1 and 5.0.

Every packet, before and after, is built by tests/packets.py: a rewrite is
right when it equals the packet the independent builder makes with the new
field and every other field unchanged (properties included).
"""

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gproxy.errors import MalformedPacket
from gproxy.protocols.mqtt import parse_connect
from gproxy.protocols.mqttconnect import rewrite
from tests import packets as P

FUZZ = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])

USER_CASES = {
    "v4-user": (dict(level=4, client_id=b"c", username="alice"), b"alice"),
    "v4-user-pass": (dict(level=4, client_id=b"c", username="alice", password=b"pw"), b"alice"),
    "v4-will-user": (dict(level=4, client_id=b"c", will_topic="t/1", will_payload=b"x" * 300,
                          username="bob", password=b"pw"), b"bob"),
    "v3-user": (dict(level=3, client_id=b"c", username="carol"), b"carol"),
    "v5-will-props-user": (dict(level=5, client_id=b"c", props=P.prop_session_expiry(9),
                                will_topic="w", will_props=P.prop_user("k", "v" * 200),
                                username="dave", password=b"pw"), b"dave"),
    "v5-empty-user": (dict(level=5, client_id=b"", username=""), b""),
    "v4-no-user": (dict(level=4, client_id=b"c"), None),
    "v4-pass-only": (dict(level=4, client_id=b"c", password=b"secret"), None),
    "v5-will-no-user": (dict(level=5, client_id=b"c", will_topic="w", password=b"p"), None),
}


@pytest.mark.parametrize("case", USER_CASES)
def test_username_whole_byte_by_byte_and_split(case):
    kw, want = USER_CASES[case]
    data = P.connect(**kw)
    assert parse_connect(data).username == want
    for n in range(len(data)):
        assert parse_connect(data[:n]) is None
    rng = random.Random(case)
    buf = b""
    while len(buf) < len(data):
        assert parse_connect(buf) is None
        buf += data[len(buf):len(buf) + rng.randint(1, 30)]
    assert parse_connect(buf + P.pingreq()).username == want


def test_an_unreadable_username_rejects_nothing():
    """APISIX never reads past the client id; neither may gproxy refuse there."""
    body = P.encode_string("MQTT") + bytes((4, 0x80, 0, 60)) + P.encode_string("id") + b"\x00"
    pkt = parse_connect(P.packet(0x10, body))
    assert (pkt.client_id, pkt.username) == (b"id", None)
    body = P.encode_string("MQTT") + bytes((4, 0x84, 0, 60)) + P.encode_string("id") + b"\x00\x09t"
    assert parse_connect(P.packet(0x10, body)).username is None


def test_the_password_is_never_kept():
    pkt = parse_connect(P.connect_v311(b"c", username="u", password=b"hunter2"))
    assert b"hunter2" not in repr(pkt).encode()


# -- the rewrite ---------------------------------------------------------------

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
blob = st.binary(max_size=40)


@st.composite
def connects(draw):
    level = draw(st.sampled_from([3, 4, 5]))
    kw = dict(level=level, client_id=draw(blob), clean_session=draw(st.booleans()),
              keepalive=draw(st.integers(0, 0xFFFF)))
    if level == 5:
        kw["props"] = draw(st.sampled_from([b"", P.prop_session_expiry(3600),
                                            P.prop_user("region", "eu" * 80)
                                            + P.prop_receive_maximum(5)]))
    if draw(st.booleans()):
        kw.update(will_topic=draw(text), will_payload=draw(blob), will_qos=draw(st.integers(0, 2)),
                  will_retain=draw(st.booleans()))
        if level == 5:
            kw["will_props"] = draw(st.sampled_from([b"", P.prop_user("a", "b")]))
    if draw(st.booleans()):
        kw["username"] = draw(text)
    if draw(st.booleans()):
        kw["password"] = draw(blob)
    return kw


@FUZZ
@given(connects(), st.one_of(st.none(), blob), st.one_of(st.none(), text))
def test_rewrite_equals_the_builders_packet_with_the_new_fields(kw, new_id, new_user):
    before = P.connect(**kw)
    want = dict(kw)
    if new_id is not None:
        want["client_id"] = new_id
    if new_user is not None:
        want["username"] = new_user
    got = rewrite(before, client_id=new_id,
                  username=None if new_user is None else new_user.encode())
    P.assert_packet(got, P.connect(**want), "rewritten CONNECT")
    parsed = parse_connect(got, max_packet=1 << 20)
    assert parsed.client_id == want["client_id"] and parsed.length == len(got)


def test_rewrite_grows_the_remaining_length_to_two_bytes():
    before = P.connect_v5(b"x", props=P.prop_session_expiry(1))
    assert before[1] < 0x80
    after = rewrite(before, client_id=b"device-" + b"9" * 200)
    assert after[1] & 0x80
    P.assert_packet(after, P.connect_v5(b"device-" + b"9" * 200, props=P.prop_session_expiry(1)))


def test_rewrite_keeps_the_first_byte_and_trailing_bytes():
    before = P.connect_v311(b"a", first_byte=0x12)
    assert rewrite(before, client_id=b"b") == P.connect_v311(b"b", first_byte=0x12)
    body = P.encode_string("MQTT") + b"\x04\x02\x00\x3c" + P.encode_string("a") + b"junk"
    assert rewrite(P.packet(0x10, body), client_id=b"bb") == P.packet(
        0x10, P.encode_string("MQTT") + b"\x04\x02\x00\x3c" + P.encode_string("bb") + b"junk")


@pytest.mark.parametrize("data", [
    P.packet(0x10, P.encode_string("MQTT") + b"\x04\x02\x00\x3c\x00\x05ab"),    # id cut short
    P.packet(0x10, P.encode_string("MQTT") + b"\x04\xc2\x00\x3c" + P.encode_string("a")
             + P.encode_string("u")),                                         # password missing
    P.packet(0x10, P.encode_string("MQTT") + b"\x05\x02\x00\x3c\x80"),       # props length cut
    P.connect_v311(b"a") + b"\x00",                                          # not one packet
    P.connect_v311(b"a")[:-1],
])
def test_rewrite_refuses_what_it_cannot_re_encode(data):
    with pytest.raises(MalformedPacket):
        rewrite(data, client_id=b"x")


def test_rewrite_refuses_a_field_over_65535_bytes():
    with pytest.raises(MalformedPacket):
        rewrite(P.connect_v311(b"a"), client_id=b"x" * 70000)
