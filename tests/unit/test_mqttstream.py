"""gproxy.protocols.mqttstream: packet boundaries in a byte stream, and DISCONNECTs.

Streams are built with tests/packets.py (never with gproxy) and fed whole, byte by
byte, in random splits and by Hypothesis; the boundaries found must be exactly the
ends of the packets that were concatenated.  DISCONNECTs are compared byte for byte
with the independent builder (MQTT 3.1.1 §3.14, 5.0 §3.14).
"""

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gproxy.protocols.mqttstream import (NORMAL, SERVER_SHUTTING_DOWN, USE_ANOTHER_SERVER,
                                         Boundaries, disconnect)
from gproxy.protocols.mqttwalk import walk_headers
from tests import packets as P

FUZZ = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])

STREAM = [P.connect_v311(b"dev-1"), P.pingreq(), P.publish("t/1", b"x" * 200, qos=1),
          P.publish("t/2", b"", qos=0), P.publish("big", b"y" * 20000, qos=1),
          P.disconnect(5, 0x8B), P.pingreq()]


def ends_of(packets_):
    out, pos = [], 0
    for pkt in packets_:
        pos += len(pkt)
        out.append(pos)
    return out






def split_points(n, rng, pieces):
    return sorted(set(rng.randrange(1, n) for _ in range(pieces))) + [n]


def test_whole_stream_ends_at_a_boundary():
    data = b"".join(STREAM)
    b = Boundaries()
    b.feed(data)
    assert b.at_boundary and b.packets == len(STREAM) and not b.lost


@pytest.mark.parametrize("seed", range(20))
def test_every_prefix_knows_whether_it_ends_between_packets(seed):
    data = b"".join(STREAM)
    rng = random.Random(seed)
    cuts = split_points(len(data), rng, rng.randrange(1, 40))
    ends = set(ends_of(STREAM))
    b = Boundaries()
    start = 0
    for end in cuts:
        b.feed(data, start, end)
        assert b.at_boundary == (end in ends), (seed, end)
        start = end


def test_byte_by_byte():
    data = b"".join(STREAM)
    ends = set(ends_of(STREAM))
    b = Boundaries()
    for i in range(len(data)):
        b.feed(data, i, i + 1)
        assert b.at_boundary == (i + 1 in ends), i


def test_next_boundary_stops_at_each_packet_end_in_turn():
    data = b"".join(STREAM)
    b = Boundaries()
    found, pos = [], 0
    assert b.next_boundary(data, 0) == 0  # already between packets
    while pos < len(data):
        b.feed(data, pos, pos + 1)  # take at least one byte of the next packet
        at = b.next_boundary(data, pos + 1)
        assert at is not None
        found.append(at)
        pos = at
    assert found == ends_of(STREAM)


def test_next_boundary_in_the_middle_of_a_body_takes_the_chunk():
    data = P.publish("t", b"z" * 1000)
    b = Boundaries()
    b.feed(data, 0, 10)
    assert b.next_boundary(data, 10, 500) is None
    assert b.left == len(data) - 500
    assert b.next_boundary(data, 500) == len(data)


def test_header_split_inside_the_remaining_length():
    data = P.publish("big", b"q" * 20000)  # remaining length takes 3 bytes
    b = Boundaries()
    for end in (1, 2, 3):
        b.feed(data, end - 1, end)
        assert not b.at_boundary and b.left == 0 and b.header
    b.feed(data, 3, 4)
    assert b.left == len(data) - 4 and not b.header
    b.feed(data, 4)
    assert b.at_boundary


def test_a_fifth_length_byte_loses_the_stream():
    b = Boundaries()
    b.feed(bytes([0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]))
    assert b.lost and not b.at_boundary
    assert b.next_boundary(P.pingreq()) is None


@given(st.lists(st.sampled_from(STREAM[1:]) | st.builds(
    lambda t, p, q: P.publish(t, p, qos=q), st.text(min_size=1, max_size=20),
    st.binary(max_size=300), st.integers(0, 2)), min_size=1, max_size=12),
    st.randoms(use_true_random=False))
@FUZZ
def test_hypothesis_boundaries_are_the_packet_ends(stream, rng):
    data = b"".join(stream)
    ends = set(ends_of(stream))
    cuts = split_points(len(data), rng, rng.randrange(0, 10)) if len(data) > 1 else [len(data)]
    b = Boundaries()
    start = 0
    for end in cuts:
        b.feed(data, start, end)
        assert b.at_boundary == (end in ends)
        start = end
    assert b.packets == len(stream)


@given(st.binary(max_size=300), st.randoms(use_true_random=False))
@FUZZ
def test_hypothesis_any_bytes_never_raise(data, rng):
    b = Boundaries()
    start = 0
    for end in (split_points(len(data), rng, 5) if len(data) > 1 else [len(data)]):
        at = b.next_boundary(data, start, end)
        assert at is None or start <= at <= end
        b.feed(data, start, end)
        start = end
    assert b.left >= 0


@pytest.mark.parametrize("level,reason,ref,expected", [
    (4, NORMAL, None, P.disconnect(4)),
    (3, SERVER_SHUTTING_DOWN, None, P.disconnect(4)),  # 3.1 has no reason code
    (5, NORMAL, None, P.disconnect(4)),  # 5.0 §3.14.2.1: reason 0 may be left out
    (5, SERVER_SHUTTING_DOWN, None, P.disconnect(5, 0x8B)),
    (5, USE_ANOTHER_SERVER, None, P.disconnect(5, 0x9C)),
    (5, USE_ANOTHER_SERVER, "mqtt-b:1883",
     P.disconnect(5, 0x9C, b"\x1c" + P.encode_string("mqtt-b:1883"))),
])
def test_disconnect_bytes(level, reason, ref, expected):
    P.assert_packet(disconnect(level, reason, ref), expected, "DISCONNECT")


# -- walking headers by peeking (the relay's WALK mode) ----------------------

class Queue:
    """What waits on a socket: ``arrived`` bytes of ``data`` after ``taken``; a peek
    sees at most ``window`` bytes at an offset, like a recv(MSG_PEEK) at SO_PEEK_OFF."""

    def __init__(self, data, window=8):
        self.data, self.taken, self.arrived, self.window = data, 0, 0, window
        self.peeks = 0

    def peek(self, offset):
        self.peeks += 1
        start = self.taken + offset
        return self.data[start:min(self.arrived, start + self.window)]


def moved_like_feed(stream, arrivals, shorts, window=8, small=0):
    """Walk ``stream`` as it arrives, moving at most what each walk found (less when
    ``shorts`` says the pipe took less); the tracker must agree with ``feed`` at every step."""
    q = Queue(stream, window)
    walked, fed = Boundaries(), Boundaries()
    shorts = list(shorts)
    for arrived in arrivals:
        q.arrived = arrived
        while q.taken < q.arrived:
            n, marks = walk_headers(walked, q.peek, 1 << 20, small)
            n = min(n, q.arrived - q.taken)
            if shorts:
                n = min(n, shorts.pop())
            if not n:
                break
            walked.advance(n, marks)
            fed.feed(stream, q.taken, q.taken + n)
            q.taken += n
            assert walked.lost == fed.lost
            if not fed.lost:
                assert (walked.left, walked.header, walked.packets) == \
                    (fed.left, fed.header, fed.packets)
    return walked, q


def test_walking_large_packets_peeks_once_a_packet_and_ends_between_them():
    stream = b"".join(P.publish("t/%d" % i, b"b" * 16384) for i in range(20))
    walked, q = moved_like_feed(stream, [len(stream)], [])
    assert walked.at_boundary and walked.packets == 20
    assert q.peeks <= 21  # one per header, and one that finds nothing after the last


def test_walking_takes_a_header_cut_short_and_finishes_it_later():
    pkt = P.publish("big", b"z" * 300000)  # four length bytes... three: under 2 MiB
    stream = pkt + P.pingreq() + pkt
    cut = len(pkt) + 2 + 2  # the second publish's first two header bytes have arrived
    walked, _ = moved_like_feed(stream, [cut, len(stream)], [])
    assert walked.at_boundary and walked.packets == 3


@pytest.mark.parametrize("seed", range(30))
def test_walking_agrees_with_feed_whatever_arrives_and_whatever_the_pipe_takes(seed):
    rng = random.Random(seed)
    pkts = [rng.choice([P.publish("a", b"x" * rng.randrange(0, 70000)), P.pingreq(),
                        P.publish("b/c", b"y" * rng.randrange(8000, 20000), qos=1),
                        P.disconnect(5, 0x8B)]) for _ in range(rng.randrange(1, 30))]
    stream = b"".join(pkts)
    arrivals = sorted(rng.randrange(1, len(stream) + 1) for _ in range(rng.randrange(1, 20)))
    shorts = [rng.randrange(1, 40000) for _ in range(rng.randrange(0, 50))]
    walked, _ = moved_like_feed(stream, arrivals + [len(stream)], shorts,
                                window=rng.choice([1, 3, 8, 64]), small=rng.choice([0, 8192]))
    assert walked.at_boundary and walked.packets == len(pkts)


@FUZZ
@given(st.lists(st.binary(min_size=1, max_size=40), max_size=20), st.integers(1, 9))
def test_walking_any_bytes_only_ever_agrees_with_feed(chunks, window):
    stream = b"".join(chunks)
    arrivals = [sum(len(c) for c in chunks[:i + 1]) for i in range(len(chunks))]
    moved_like_feed(stream, arrivals, [], window)


def test_a_fifth_length_byte_loses_the_walk_like_feed():
    stream = P.pingreq() + b"\x30\xff\xff\xff\xff\x01" + b"x" * 10
    walked, _ = moved_like_feed(stream, [len(stream)], [])
    assert walked.lost


def test_a_header_begun_earlier_with_nothing_new_walks_nothing():
    walked = Boundaries()
    walked.feed(b"\x30\x80")  # two bytes of a header, the rest not here yet
    n, marks = walk_headers(walked, lambda offset: b"", 1 << 20)
    assert n == 0
