"""gproxy.protocols.wsframe against RFC 6455 §5 and §7.4, MQTT §6.

Frames come from tests/wsframes.py (an independent builder).  Streams of
frames are fed whole, byte by byte and in seeded random splits, and must give
the same MQTT bytes and control events every time; each refusal carries the
close code the RFC asks for; Hypothesis checks that any bytes only ever give
events or FrameError, and that the payload bytes delivered never depend on how
the input was split.
"""

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gproxy.errors import FrameError
from gproxy.protocols import wsframe as F
from tests import packets as P
from tests import wsframes as W

FUZZ = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])
CONNECT = P.connect_v311("ws-client")
BIG = bytes(range(256)) * 300  # 76800 B: a 64-bit length


def run(stream, chunks=None, **kw):
    """Feed ``stream`` in ``chunks`` (sizes); return (data bytes, [control events], [lasts])."""
    parser = F.FrameParser(**kw)
    data, controls, lasts = bytearray(), [], []
    pos = 0
    for size in chunks or [len(stream)]:
        for kind, a, b in parser.feed(stream[pos:pos + size]):
            if kind == F.DATA:
                data += a
                lasts.append(b)
            else:
                controls.append((kind, a, b))
        pos += size
    assert pos >= len(stream)
    return bytes(data), controls, lasts


STREAMS = {
    "one-frame": (W.binary(CONNECT), CONNECT, []),
    "fragmented": (W.fragments(CONNECT, [3, 5]), CONNECT, []),
    "ping-first": (W.frame(W.PING, b"hi") + W.binary(CONNECT), CONNECT, [(F.PING, b"hi", None)]),
    "ping-between-fragments": (W.frame(W.BINARY, CONNECT[:4], fin=False)
                               + W.frame(W.PING, b"") + W.frame(W.PONG, b"x")
                               + W.frame(W.CONT, CONNECT[4:]),
                               CONNECT, [(F.PING, b"", None), (F.PONG, b"x", None)]),
    "16-bit-length": (W.binary(b"\x55" * 300), b"\x55" * 300, []),
    "64-bit-length": (W.binary(BIG), BIG, []),
    "non-minimal-length": (W.binary(CONNECT, length_bytes=8), CONNECT, []),
    "empty-frames": (W.frame(W.BINARY, b"", fin=False) + W.frame(W.CONT, CONNECT, fin=False)
                     + W.frame(W.CONT, b""), CONNECT, []),
    "zero-mask": (W.binary(CONNECT, mask=b"\0\0\0\0"), CONNECT, []),
    "close-after": (W.binary(CONNECT) + W.close(1000, b"bye") + W.binary(b"ignored"),
                    CONNECT, [(F.CLOSE, 1000, "bye")]),
    "close-empty": (W.close(), b"", [(F.CLOSE, None, "")]),
    "close-4000": (W.close(4000, "ünï".encode()), b"", [(F.CLOSE, 4000, "ünï")]),
}


@pytest.mark.parametrize("name", STREAMS)
def test_whole(name):
    stream, data, controls = STREAMS[name]
    assert run(stream)[:2] == (data, controls)


@pytest.mark.parametrize("name", STREAMS)
def test_byte_by_byte(name):
    stream, data, controls = STREAMS[name]
    assert run(stream, [1] * len(stream))[:2] == (data, controls)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("name", STREAMS)
def test_random_splits(name, seed):
    stream, data, controls = STREAMS[name]
    rng = random.Random("%s/%d" % (name, seed))
    chunks, left = [], len(stream)
    while left > 0:
        chunks.append(min(left, rng.randint(1, 700)))
        left -= chunks[-1]
    assert run(stream, chunks)[:2] == (data, controls)


def test_last_marks_the_end_of_each_message():
    stream = W.fragments(b"abcdef", [2, 2]) + W.binary(b"xyz")
    data, _, lasts = run(stream)
    assert data == b"abcdefxyz"
    assert lasts == [False, False, True, True]
    data, _, lasts = run(stream, [1] * len(stream))
    assert lasts.count(True) == 2 and lasts[-1] is True


def test_payload_is_streamed_not_buffered():
    parser = F.FrameParser()
    stream = W.binary(BIG)
    events = parser.feed(stream[:1000])
    assert events and events[0][0] == F.DATA and 0 < len(events[0][1]) < 1000


def test_server_side_frames_unmasked():
    stream = W.binary(CONNECT, mask=None) + W.frame(W.PING, b"p", mask=None)
    assert run(stream, masked=False)[:2] == (CONNECT, [(F.PING, b"p", None)])


BAD = {
    "unmasked": (W.binary(CONNECT, mask=None), F.PROTOCOL_ERROR),
    "text": (W.frame(W.TEXT, b"hello"), F.UNSUPPORTED_DATA),
    "rsv1": (W.frame(W.BINARY, b"x", rsv=4), F.PROTOCOL_ERROR),
    "rsv3": (W.frame(W.BINARY, b"x", rsv=1), F.PROTOCOL_ERROR),
    "opcode-3": (W.frame(0x3, b"x"), F.PROTOCOL_ERROR),
    "opcode-0xB": (W.frame(0xB, b""), F.PROTOCOL_ERROR),
    "lone-continuation": (W.frame(W.CONT, b"x"), F.PROTOCOL_ERROR),
    "binary-inside-message": (W.frame(W.BINARY, b"a", fin=False) + W.binary(b"b"),
                              F.PROTOCOL_ERROR),
    "text-continuation": (W.frame(W.BINARY, b"a", fin=False) + W.frame(W.TEXT, b"b"),
                          F.UNSUPPORTED_DATA),
    "fragmented-ping": (W.frame(W.PING, b"x", fin=False), F.PROTOCOL_ERROR),
    "ping-126": (W.frame(W.PING, b"p" * 126), F.PROTOCOL_ERROR),
    "close-1-byte": (W.frame(W.CLOSE, b"\x03"), F.PROTOCOL_ERROR),
    "close-1005": (W.close(1005), F.PROTOCOL_ERROR),
    "close-999": (W.close(999), F.PROTOCOL_ERROR),
    "close-2000": (W.close(2000), F.PROTOCOL_ERROR),
    "close-bad-utf8": (W.close(1000, b"\xff\xfe"), F.INVALID_DATA),
    "64-bit-top-bit": (b"\x82\xff" + b"\x80" + b"\0" * 7 + b"\x11\x22\x33\x44", F.PROTOCOL_ERROR),
}


@pytest.mark.parametrize("name", BAD)
def test_refusals_carry_the_right_close_code(name):
    stream, code = BAD[name]
    for chunks in ([len(stream)], [1] * len(stream)):
        with pytest.raises(FrameError) as err:
            run(stream, chunks)
        assert err.value.code == code, str(err.value)


def test_too_big_is_1009_as_soon_as_the_header_says_so():
    parser = F.FrameParser(max_payload=16384)
    header = W.binary(b"x" * 16385)[:8]  # 2 + 2 length + 4 mask
    with pytest.raises(FrameError) as err:
        parser.feed(header)
    assert err.value.code == F.TOO_BIG
    assert run(W.binary(b"x" * 16384), max_payload=16384)[0] == b"x" * 16384


def test_events_before_an_error_are_kept():
    stream = W.frame(W.PING, b"1") + W.binary(b"ok") + W.frame(W.TEXT, b"no")
    with pytest.raises(FrameError) as err:
        F.FrameParser().feed(stream)
    assert err.value.events == [(F.PING, b"1", None), (F.DATA, b"ok", True)]


@pytest.mark.parametrize("n", [0, 1, 125, 126, 65535, 65536, 70000])
def test_encoded_frames_read_back_with_the_independent_reader(n):
    payload = bytes(i & 0xFF for i in range(n))
    fin, opcode, body, rest = W.read_frame(F.encode_frame(F.BINARY, payload))
    assert (fin, opcode, body, rest) == (True, W.BINARY, payload, b"")
    header = F.frame_header(F.BINARY, n)
    assert len(header) == (2 if n < 126 else 4 if n < 65536 else 10)  # minimal (§5.2)


def test_masked_encoding_matches_the_independent_builder():
    mask = b"\x37\xfa\x21\x3d"  # RFC 6455 §5.7's example key
    assert F.encode_frame(F.TEXT, b"Hello", mask=mask) == bytes.fromhex("818537fa213d7f9f4d5158")
    assert F.encode_frame(F.BINARY, CONNECT, mask=mask) == W.binary(CONNECT, mask=mask)


def test_close_payload():
    assert F.close_payload() == b""
    assert W.close_code(F.close_payload(1009, "too big")) == 1009
    assert len(F.close_payload(1000, "x" * 500)) == 125


@FUZZ
@given(st.binary(max_size=3000), st.binary(min_size=4, max_size=4), st.integers(0, 3))
def test_unmask_agrees_with_an_independent_xor_in_c_and_in_python(data, key, offset):
    rotated = key[offset:] + key[:offset]
    assert F.unmask(data, key, offset) == W.xor(data, rotated)
    assert F.unmask(memoryview(data), key, offset) == W.xor(data, rotated)
    assert F.unmask_py(data, rotated) == W.xor(data, rotated)


def test_the_c_routine_is_used():
    """websockets' speedups is installed with gproxy (setup.cfg): a missing wheel
    would silently cost ~400x the CPU per WebSocket byte."""
    from websockets.speedups import apply_mask
    assert F._apply_mask is apply_mask


def test_unmask_offsets():
    key = b"\x01\x02\x03\x04"
    data = bytes(range(11))
    whole = F.unmask(data, key)
    assert F.unmask(data[:5], key) + F.unmask(data[5:], key, 5 % 4) == whole
    assert F.unmask(whole, key) == data


@FUZZ
@given(st.binary(max_size=400), st.lists(st.integers(1, 64), max_size=10))
def test_any_bytes_give_events_or_a_frame_error(data, cuts):
    parser = F.FrameParser(max_payload=1000)
    pos = 0
    try:
        for cut in cuts + [len(data)]:
            events = parser.feed(data[pos:pos + cut])
            pos += cut
            for kind, a, b in events:
                assert kind in (F.DATA, F.PING, F.PONG, F.CLOSE)
    except FrameError as exc:
        assert exc.code in (F.PROTOCOL_ERROR, F.UNSUPPORTED_DATA, F.INVALID_DATA, F.TOO_BIG)


frame_st = st.one_of(
    st.builds(lambda p, m: W.binary(p, mask=m), st.binary(max_size=300), st.binary(min_size=4, max_size=4)),
    st.builds(lambda p: W.frame(W.PING, p), st.binary(max_size=125)),
    st.builds(lambda p, s: W.fragments(p, s), st.binary(max_size=200),
              st.lists(st.integers(0, 50), max_size=4)),
)


@FUZZ
@given(st.lists(frame_st, max_size=6), st.lists(st.integers(1, 97), max_size=20))
def test_payload_does_not_depend_on_the_splits(frames, cuts):
    stream = b"".join(frames)
    whole = run(stream)
    chunks, left = [], len(stream)
    for cut in cuts:
        if left <= 0:
            break
        chunks.append(min(cut, left))
        left -= chunks[-1]
    if left > 0:
        chunks.append(left)
    assert run(stream, chunks)[:2] == whole[:2]
