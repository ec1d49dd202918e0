"""Pure parts of moving sessions: the handed state's value packing, and the
rebalancing plan (when one worker holds far more sessions than the others)."""

import json

import pytest

from gproxy.protocols.mqttstream import Boundaries
from gproxy.protocols.wsframe import FrameParser
from gproxy.proxy.relay import handoff
from gproxy.runtime.rebalance import plan


@pytest.mark.parametrize("value", [None, True, 0, 7, 1.5, "x", b"", b"\x00\xff",
                                   bytearray(b"ab"), (1, b"\x01\x02\x03\x04", 5), (None,)])
def test_values_survive_json_with_their_types(value):
    back = handoff.unpack(json.loads(json.dumps(handoff.pack(value))))
    assert back == value and type(back) is type(value)


def test_an_object_of_another_kind_is_refused():
    with pytest.raises(TypeError):
        handoff.pack(object())


def test_a_tracker_mid_header_and_a_parser_mid_frame_round_trip():
    track = Boundaries()
    track.feed(b"\x30\x80")  # a PUBLISH whose length goes on in the next read
    parser = FrameParser(masked=True)
    parser.feed(b"\x82\x85\x01\x02\x03\x04ab")  # two of five masked payload bytes
    for obj, rest in ((track, b"\x01"), (parser, b"cde")):
        state = json.loads(json.dumps(handoff.slots_state(obj)))
        copy = handoff.load_slots(type(obj).__new__(type(obj)), state)
        if obj is track:
            copy.feed(rest)
            obj.feed(rest)
            assert (copy.left, copy.header, copy.packets) == (obj.left, obj.header, obj.packets)
        else:
            assert copy.feed(rest) == obj.feed(rest)


@pytest.mark.parametrize("counts, step", [
    ([100, 100], None),                 # even
    ([300, 0], (0, 1, 150)),            # half the gap: both at the average
    ([1000, 0, 0, 0], (0, 1, 500)),     # down to... the gap's half, never past the other
    ([5000, 0], (0, 1, 1000)),          # at most max_move a round
    ([250, 100], None),                 # 250 < 1.5 x 175
    ([150, 0], None),                   # gap under min_gap
    ([0, 400], (1, 0, 200)),
    ([7], None),
])
def test_the_plan_moves_from_the_busiest_to_the_least_busy(counts, step):
    assert plan(counts, ratio=1.5, min_gap=200, max_move=1000) == step
