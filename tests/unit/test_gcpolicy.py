"""The CLI's garbage-collection rounds: survivors frozen, and a leak of frozen cycles bounded.

Each test runs the policy's rounds by hand on this process's real collector
(and puts it back as it was: nothing frozen, automatic collection on); the
process's size and its live sessions are the test's numbers.
"""

import gc

import pytest

from gproxy.runtime import gcpolicy

MIB = 1024 * 1024


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


class Process:
    """What the policy reads: RSS and live sessions, set by the test."""

    def __init__(self):
        self.rss_bytes, self.sessions = 100 * MIB, 0

    def policy(self, **kwargs):
        return gcpolicy.Policy(live=lambda: self.sessions, rss=lambda: self.rss_bytes,
                               **kwargs)


def test_a_round_freezes_what_survived_and_collects_the_rest(collector):
    policy = Process().policy()
    kept = [Node() for _ in range(1000)]
    for _ in range(100):
        cycle()  # garbage as soon as made: the round's collection frees it
    policy.round()
    assert not any(isinstance(o, Node) for o in gc.get_objects())  # nothing left unfrozen
    assert policy.audits == 0 and len(kept) == 1000


def test_growth_the_live_sessions_do_not_explain_brings_an_audit(collector):
    proc = Process()
    policy = proc.policy(per_session=64 * 1024, allowance=32 * MIB)
    proc.sessions, proc.rss_bytes = 400, 125 * MIB  # 25 MiB for 400 sessions: explained
    held = [cycle() for _ in range(2000)]
    policy.round()
    assert policy.audits == 0
    del held[:]  # those sessions end, leaving cycles no round will ever free (frozen)...
    held = [cycle() for _ in range(2000)]  # ... and 400 others take their place
    proc.rss_bytes = 160 * MIB  # the process grew though the sessions did not
    policy.round()
    assert policy.audits == 1 and policy.found >= 4000  # the leaked cycles, collected
    policy.round()
    assert policy.audits == 1  # measured from the audit on: nothing more to explain


def test_memory_kept_after_a_peak_of_sessions_is_explained_by_the_peak(collector):
    proc = Process()
    policy = proc.policy(per_session=64 * 1024, allowance=32 * MIB)
    proc.sessions, proc.rss_bytes = 2000, 200 * MIB  # a burst: 100 MiB for 2,000 sessions
    policy.round()
    proc.sessions = 10  # they end; the heap keeps its size (freed memory is reused later)
    for _ in range(5):
        policy.round()
    assert policy.audits == 0
