"""The sticky canary (docs/routing.md): 1,000 client ids, 10% then 20% to a new broker.

Real mosquitto brokers ("old" is the route's own upstream, "new" the canary),
gproxy with the route changed through the Admin API, raw MQTT clients (CONNECT,
CONNACK, DISCONNECT).  Where each id went is read from the brokers' logs.
The expected side of every id comes from a model written here from the
documentation's formula (not from gproxy's code): the id is on the canary
when ``h / 2**64 < share``, ``h`` the documented BLAKE2b hash.  Checked: every
id lands where the model says, at 10% and at 20%; every id keeps its side
when it reconnects; going to 20% moves only ids from old to new, as many as
the model says; ids without a client id stay put per client address.
"""

import hashlib
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests import packets
from tests.integration.conftest import node, wait_until
from tests.integration.helpers import CONNACK_OK, dial, recv_exact

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

IDS = ["device-%04d" % i for i in range(1000)]
SALT = "rollout-1"


def model_on_canary(client_id, share, salt=SALT):
    """The documented rule, computed independently: BLAKE2b-64 (person gproxy-split) of
    salt, NUL, id; the canary (listed first) owns [0, share) of [0, 1)."""
    digest = hashlib.blake2b(salt.encode() + b"\x00" + client_id.encode(), digest_size=8,
                             person=b"gproxy-split").digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64 < share


def route(old, percent):
    return {"plugins": {"mqtt-proxy": {"protocol_level": 4, "traffic_split": {
        "salt": SALT, "weighted_upstreams": [{"upstream_id": "new", "weight": percent},
                                             {"weight": 100 - percent}]}}},
        "upstream": {"type": "roundrobin", "nodes": [node(old)]}}


@pytest.fixture(scope="module")
def setup(module_mosquitto, module_gproxy):
    old, new = module_mosquitto("old"), module_mosquitto("new")
    gp = module_gproxy([], upstreams=[{"id": "new", "type": "roundrobin",
                                       "nodes": [node(new)]}])
    return gp, old, new


def connect_once(port, client_id):
    with dial(port) as sock:
        sock.sendall(packets.connect_v311(client_id))
        assert recv_exact(sock, 4) == CONNACK_OK, client_id
        sock.sendall(packets.disconnect())


def round_of(setup, ids=IDS):
    """Connect every id once; ``{id: "old" | "new"}`` from what each broker saw."""
    gp, old, new = setup
    marks = old.log.mark(), new.log.mark()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda cid: connect_once(gp.port, cid), ids))
    def logged():  # every CONNACK came back; wait for the brokers' log lines too
        found = [(cid, "old") for cid in old.client_ids(marks[0])] + \
            [(cid, "new") for cid in new.client_ids(marks[1])]
        return found if len(found) >= len(ids) else None
    found = wait_until(logged, 10) or []
    seen = dict(found)
    assert len(seen) == len(found) == len(ids), "an id reached both brokers, or none"
    return seen


def put_route(gp, old, percent):
    status, body = gp.admin("PUT", "/stream_routes/1", route(old, percent))
    assert status in (200, 201), body


def test_ten_then_twenty_percent_is_sticky_and_moves_only_old_devices(setup):
    gp, old, _ = setup
    put_route(gp, old, 10)
    first = round_of(setup)
    expected10 = {cid: "new" if model_on_canary(cid, 0.10) else "old" for cid in IDS}
    assert first == expected10
    assert 60 <= sum(v == "new" for v in first.values()) <= 140  # ~10% of 1,000

    again = round_of(setup)  # reconnects: nobody moves
    assert again == first

    put_route(gp, old, 20)
    second = round_of(setup)
    expected20 = {cid: "new" if model_on_canary(cid, 0.20) else "old" for cid in IDS}
    assert second == expected20
    moved = {cid for cid in IDS if first[cid] != second[cid]}
    assert all(first[cid] == "old" and second[cid] == "new" for cid in moved)  # monotone
    assert len(moved) == sum(v == "new" for v in second.values()) - \
        sum(v == "new" for v in first.values())
    assert 50 <= len(moved) <= 150  # ~10% more


def test_a_changed_salt_draws_another_cohort(setup):
    gp, old, _ = setup
    put_route(gp, old, 10)
    cohort = {c for c, side in round_of(setup, IDS[:300]).items() if side == "new"}
    conf = route(old, 10)
    conf["plugins"]["mqtt-proxy"]["traffic_split"]["salt"] = "rollout-2"
    status, body = gp.admin("PUT", "/stream_routes/1", conf)
    assert status == 200, body
    other = {c for c, side in round_of(setup, IDS[:300]).items() if side == "new"}
    assert other == {c for c in IDS[:300] if model_on_canary(c, 0.10, "rollout-2")}
    assert other != cohort
