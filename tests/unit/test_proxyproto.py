"""gproxy.protocols.proxyproto against HAProxy's PROXY protocol spec.

Headers come from tests/wire.py (hand-built with struct), never from gproxy.
Each is fed whole, byte by byte and in random splits; Hypothesis checks that
any bytes give only None, a header or MalformedHeader, that ``wanted`` never
asks to read past the header, and that what gproxy builds parses back.
"""

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gproxy.errors import MalformedHeader
from gproxy.protocols import proxyproto as pp
from tests import wire

FUZZ = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])

VALID = {
    "v1-tcp4": (wire.proxy_v1("192.0.2.10", "198.51.100.1", 56324, 8883),
                ("192.0.2.10", 56324), ("198.51.100.1", 8883)),
    "v1-tcp6": (wire.proxy_v1("2001:db8::1", "2001:db8::2", 1, 65535),
                ("2001:db8::1", 1), ("2001:db8::2", 65535)),
    "v1-port-0": (wire.proxy_v1("10.0.0.1", "10.0.0.2", 0, 0), ("10.0.0.1", 0), ("10.0.0.2", 0)),
    "v1-longest": (wire.proxy_v1("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                                 "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535, 65535),
                   ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
                   ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535)),
    "v1-unknown": (wire.proxy_v1_unknown(), None, None),
    "v1-unknown-tail": (wire.proxy_v1_unknown(" 1.2.3.4 5.6.7.8 1 2"), None, None),
    "v2-inet": (wire.proxy_v2("203.0.113.7", "10.1.2.3", 40000, 8883),
                ("203.0.113.7", 40000), ("10.1.2.3", 8883)),
    "v2-inet6": (wire.proxy_v2("2001:db8::7", "2001:db8::8", 40001, 1883),
                 ("2001:db8::7", 40001), ("2001:db8::8", 1883)),
    "v2-tlvs": (wire.proxy_v2("203.0.113.8", "10.1.2.3", 1, 2,
                              tlvs=wire.tlv(0x02, b"broker.example") + wire.tlv(0x05, b"\x01" * 300)),
                ("203.0.113.8", 1), ("10.1.2.3", 2)),
    "v2-local": (wire.proxy_v2_local(), None, None),
    "v2-local-with-addresses": (wire.proxy_v2("1.1.1.1", "2.2.2.2", 3, 4, command=0), None, None),
    "v2-udp": (wire.proxy_v2("1.1.1.1", "2.2.2.2", 3, 4, transport=2), None, None),
}
TRAILER = b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00"  # the client's CONNECT follows


def check(header, case):
    data, src, dst = VALID[case]
    assert isinstance(header, pp.ProxyHeader), header
    assert header.length == len(data)
    assert (header.src, header.dst) == (src, dst)


@pytest.mark.parametrize("case", VALID)
def test_whole_and_with_the_client_bytes_after_it(case):
    data = VALID[case][0]
    check(pp.parse(data), case)
    check(pp.parse(bytearray(data + TRAILER)), case)


@pytest.mark.parametrize("case", VALID)
def test_byte_by_byte_and_wanted_never_reads_past_the_header(case):
    data = VALID[case][0]
    for n in range(len(data)):
        assert pp.parse(data[:n]) is None, "need-more expected at %d bytes" % n
        want = pp.wanted(data[:n])
        assert n < want <= len(data), (n, want)
    check(pp.parse(data), case)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("case", VALID)
def test_random_splits(case, seed):
    data = VALID[case][0] + TRAILER
    rng = random.Random("%s/%d" % (case, seed))
    buf = b""
    while True:
        buf += data[len(buf):len(buf) + rng.randint(1, 20)]
        header = pp.parse(buf)
        if header is not None:
            return check(header, case)
        assert len(buf) < len(VALID[case][0])


BROKEN = {
    "plain-mqtt": TRAILER,
    "http": b"GET / HTTP/1.1\r\n",
    "v1-lowercase": b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
    "v1-bad-proto": b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
    "v1-family-mismatch": b"PROXY TCP4 ::1 ::1 1 2\r\n",
    "v1-bad-ip": b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n",
    "v1-port-too-big": b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
    "v1-port-leading-zero": b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
    "v1-port-sign": b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
    "v1-missing-field": b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
    "v1-double-space": b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",
    "v1-no-crlf-in-107": b"PROXY TCP4 " + b"1" * 120,
    "v1-lf-only": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n" + b"x" * 100,
    "v1-non-ascii": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \xff\r\n",
    "v2-version-1": wire.V2_SIG + b"\x11\x11\x00\x0c" + b"\x00" * 12,
    "v2-command-2": wire.V2_SIG + b"\x22\x11\x00\x0c" + b"\x00" * 12,
    "v2-family-5": wire.V2_SIG + b"\x21\x51\x00\x0c" + b"\x00" * 12,
    "v2-short-inet": wire.V2_SIG + b"\x21\x11\x00\x08" + b"\x00" * 8,
    "v2-short-inet6": wire.V2_SIG + b"\x21\x21\x00\x0c" + b"\x00" * 12,
    "v2-bad-signature": wire.V2_SIG[:11] + b"\x0b\x21\x11\x00\x0c" + b"\x00" * 12,
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_headers_raise(case):
    with pytest.raises(MalformedHeader):
        pp.parse(BROKEN[case])


@pytest.mark.parametrize("case", BROKEN)
def test_broken_headers_raise_as_soon_as_fed_in_pieces(case):
    data, raised = BROKEN[case], False
    for n in range(1, len(data) + 1):
        try:
            assert pp.parse(data[:n]) is None
        except MalformedHeader:
            raised = True
            break
    assert raised


@FUZZ
@given(st.binary(max_size=300))
def test_any_bytes_give_none_a_header_or_malformed(data):
    try:
        header = pp.parse(data)
    except MalformedHeader:
        return
    if header is None:
        assert len(data) < pp.wanted(data) <= max(len(data) + 1, 16 + 65535)
    else:
        assert 0 < header.length <= len(data)


@FUZZ
@given(st.sampled_from(sorted(VALID)), st.binary(max_size=40))
def test_a_verdict_never_changes_as_bytes_arrive(case, tail):
    data = VALID[case][0] + tail
    for n in range(len(data) + 1):
        header = pp.parse(data[:n])
        if header is not None:
            assert n == len(VALID[case][0])
            check(header, case)
            return
    raise AssertionError("no header")


# -- what gproxy sends ---------------------------------------------------------

@pytest.mark.parametrize("src,dst", [("192.0.2.1", "198.51.100.2"), ("2001:db8::1", "::1"),
                                     ("192.0.2.1", "::1"), ("::1", "127.0.0.1")])
def test_builders_match_the_hand_built_headers(src, dst):
    mixed = (":" in src) != (":" in dst)
    want_src = "::ffff:" + src if mixed and ":" not in src else src
    want_dst = "::ffff:" + dst if mixed and ":" not in dst else dst
    assert pp.build_v1(src, 1234, dst, 8883) == wire.proxy_v1(want_src, want_dst, 1234, 8883)
    assert pp.build_v2(src, 1234, dst, 8883) == wire.proxy_v2(want_src, want_dst, 1234, 8883)


@FUZZ
@given(st.ip_addresses(), st.ip_addresses(), st.integers(0, 65535), st.integers(0, 65535))
def test_built_headers_parse_back(src, dst, sport, dport):
    for build in (pp.build_v1, pp.build_v2):
        header = pp.parse(build(str(src), sport, str(dst), dport) + TRAILER)
        assert header.src[1] == sport and header.dst[1] == dport
        if src.version == dst.version:
            assert (header.src[0], header.dst[0]) == (str(src), str(dst))
