"""gproxy.protocols.tlshello: the SNI of a ClientHello, before any handshake.

ClientHellos come from OpenSSL (Python's ssl over memory BIOs) or are built by
hand in tests/wire.py from RFC 8446 / RFC 6066; fed whole, byte by byte, in
random splits and cut into several records; Hypothesis checks that any bytes
give only None, a ClientHello or MalformedHeader.
"""

import random
import ssl

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gproxy.errors import MalformedHeader
from gproxy.protocols import tlshello
from tests import wire

FUZZ = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])

CASES = {
    "openssl-sni": (wire.openssl_client_hello("broker.example.com"), "broker.example.com"),
    "openssl-tls12-sni": (wire.openssl_client_hello("a.b.example", ssl.TLSVersion.TLSv1_2),
                          "a.b.example"),
    "openssl-no-sni": (wire.openssl_client_hello(None), None),
    "openssl-upper-case": (wire.openssl_client_hello("Tenant-A.Example.COM"),
                           "tenant-a.example.com"),
    "hand-sni": (wire.records(wire.client_hello("x.io")), "x.io"),
    "hand-trailing-dot": (wire.records(wire.client_hello("x.io.")), "x.io"),
    "hand-no-extensions": (wire.records(wire.client_hello()), None),
    "hand-empty-extensions": (wire.records(wire.client_hello(extensions=[])), None),
    "hand-sni-after-others": (wire.records(wire.client_hello(
        "late.example", extensions=[(0x000a, b"\x00\x02\x00\x1d"), (0x0010, b"\x00\x03\x02h2")])),
        "late.example"),
    "hand-other-name-type-first": (wire.records(wire.client_hello(
        names=[(7, b"ignored"), (0, b"second.example")])), "second.example"),
    "hand-three-records": (wire.records(wire.client_hello("split.example"), sizes=[3, 40]),
                           "split.example"),
    "hand-record-per-byte-header": (wire.records(wire.client_hello("tiny.example"),
                                                 sizes=[1, 1, 1, 1, 1]), "tiny.example"),
}


def check(hello, case):
    data, name = CASES[case]
    assert isinstance(hello, tlshello.ClientHello), hello
    assert hello.server_name == name
    assert hello.length == len(data)


@pytest.mark.parametrize("case", CASES)
def test_whole(case):
    check(tlshello.parse(CASES[case][0]), case)
    check(tlshello.parse(bytearray(CASES[case][0])), case)


@pytest.mark.parametrize("case", CASES)
def test_byte_by_byte_and_wanted_stays_inside_the_hello(case):
    data = CASES[case][0]
    for n in range(len(data)):
        assert tlshello.parse(data[:n]) is None, n
        assert n < tlshello.wanted(data[:n]) <= len(data)
    check(tlshello.parse(data), case)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("case", CASES)
def test_random_splits(case, seed):
    data = CASES[case][0]
    rng = random.Random("%s/%d" % (case, seed))
    buf = b""
    while True:
        buf += data[len(buf):len(buf) + rng.randint(1, 200)]
        hello = tlshello.parse(buf)
        if hello is not None:
            return check(hello, case)


BROKEN = {
    "mqtt-connect": b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00",
    "http": b"GET / HTTP/1.1\r\n\r\n",
    "alert-record": b"\x15\x03\x01\x00\x02\x02\x28",
    "ssl2-hello": b"\x80\x2e\x01\x00\x02" + b"\x00" * 45,
    "record-version-2": b"\x16\x02\x00\x00\x05" + b"\x01\x00\x00\x01\x00",
    "zero-length-record": b"\x16\x03\x01\x00\x00",
    "record-too-long": b"\x16\x03\x01\x40\x01" + b"\x01",
    "server-hello": wire.records(b"\x02" + wire.client_hello("x")[1:]),
    "sni-bad-char": wire.records(wire.client_hello(names=[(0, b"a b")])),
    "sni-empty": wire.records(wire.client_hello(names=[(0, b"")])),
    "truncated-body": wire.records(b"\x01\x00\x00\x05\x03\x03\x00\x00\x00"),
    "hello-then-alert": wire.records(wire.client_hello("x.io"), sizes=[10])[:15]
    + b"\x15\x03\x03\x00\x02\x02\x28",
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken(case):
    with pytest.raises(MalformedHeader):
        data = BROKEN[case]
        for n in range(1, len(data) + 1):
            tlshello.parse(data[:n])


def test_limit_bounds_the_bytes_waited_for():
    big = wire.records(wire.client_hello("big.example", extensions=[(0x15, b"\x00" * 9000)]),
                       sizes=[5000])
    assert tlshello.parse(big, limit=20000).server_name == "big.example"
    with pytest.raises(MalformedHeader):
        tlshello.parse(big[:100], limit=4096)


@FUZZ
@given(st.binary(max_size=400))
def test_any_bytes(data):
    try:
        hello = tlshello.parse(data)
    except MalformedHeader:
        return
    if hello is None:
        assert tlshello.wanted(data) > len(data)
    else:
        assert hello.length <= len(data)


@FUZZ
@given(st.sampled_from(sorted(CASES)), st.integers(0, 10 ** 6), st.binary(max_size=3))
def test_one_corrupted_byte_never_crashes(case, where, value):
    data = bytearray(CASES[case][0])
    if value:
        data[where % len(data)] = value[0]
    try:
        tlshello.parse(bytes(data))
    except MalformedHeader:
        pass
