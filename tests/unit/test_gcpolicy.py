"""The CLI's garbage-collection rounds: survivors frozen, and a leak of frozen cycles bounded.

Each test runs the policy's rounds by hand on this process's real collector
(and puts it back as it was: nothing frozen, automatic collection on).
"""

import gc

import pytest

from gproxy.runtime import gcpolicy


class Node:
    def __init__(self):
        self.other = None


@pytest.fixture
def collector():
    gc.collect()
    gc.freeze()  # the test's own start-up: out of the way, like the CLI's
    yield
    gc.unfreeze()
    gc.collect()


def cycle():
    a, b = Node(), Node()
    a.other, b.other = b, a
    return a


def test_a_round_freezes_what_survived_and_collects_the_rest(collector):
    policy = gcpolicy.Policy(allowance=10_000)
    before = gc.get_freeze_count()
    kept = [Node() for _ in range(1000)]
    for _ in range(100):
        cycle()  # garbage as soon as made: the round's collection frees it
    policy.round()
    assert gc.get_freeze_count() - before >= 1000
    assert not any(isinstance(o, Node) for o in gc.get_objects())  # none left unfrozen
    assert policy.audits == 0
    del kept


def test_frozen_cycles_that_outgrow_the_live_sessions_bring_an_audit(collector):
    live = [0]
    policy = gcpolicy.Policy(live=lambda: live[0], per_session=10, allowance=3000)
    live[0] = 400
    held = [cycle() for _ in range(2000)]  # 4,000 objects for 400 sessions: explained
    policy.round()
    assert policy.audits == 0
    del held[:]  # those sessions end, leaving cycles no round will ever free (frozen)...
    held = [cycle() for _ in range(2000)]  # ... and 400 others take their place
    policy.round()
    assert policy.audits == 1 and policy.found >= 4000  # the leaked ones, collected
    policy.round()
    assert policy.audits == 1  # measured from the audit on: nothing more to explain


def test_no_audit_while_the_live_sessions_account_for_the_growth(collector):
    live = [0]
    policy = gcpolicy.Policy(live=lambda: live[0], per_session=10, allowance=1000)
    sessions = []
    for step in range(5):
        sessions += [Node() for _ in range(2000)]  # 2,000 objects for 200 sessions
        live[0] += 200
        policy.round()
    assert policy.audits == 0
