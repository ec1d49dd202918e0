"""Sessions leave no reference cycles: every per-session object is freed by its
reference count, so the CLI can keep live sessions out of the cyclic collector
(runtime/gcpolicy.py freezes them) without leaking the ones that end.

``gc_program.py`` runs gproxy embedded (so its objects are in the child's
heap), turns automatic collection off, runs sessions that end every way a
session ends, and counts what one collection then finds unreachable.
"""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration
PROGRAM = os.path.join(os.path.dirname(__file__), "gc_program.py")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PER_SESSION = {"Session", "SessionInfo", "Relay", "RelayedSession", "Direction", "Boundaries",
               "io", "socket", "method", "greenlet", "Greenlet"}


def run(broker, tmp_path, sessions):
    out = subprocess.run([sys.executable, PROGRAM, str(broker.port), str(tmp_path),
                          str(sessions)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout)


def test_ended_sessions_leave_no_cyclic_garbage(mosquitto, tmp_path):
    broker = mosquitto()
    few = run(broker, tmp_path, 40)
    many = run(broker, tmp_path, 240)
    for report in (few, many):
        # the evicted quarter at least was live (idle ones may have timed out already)
        assert report["left"] == 0 and report["live_before_end"] >= report["sessions"] // 4
        assert report["relays_seen"] >= report["sessions"] // 4, report  # ours to collect
        assert not PER_SESSION & {kind for kind, _ in report["kinds"]}, report
    # what is left is the Admin API's one eviction request, whatever the number of sessions
    assert many["unreachable"] == few["unreachable"], (few, many)


def test_sessions_moved_by_a_handover_leave_no_cycles_and_stay_in_view_when_frozen():
    """A live upgrade's objects per session (the handed state, limit-conn ``Slot``s,
    least_conn ``Counted``s, the released relay in the old process, the adopted one
    in the new) add no reference cycle; and once the new process's GC round has
    frozen the adopted sessions (runtime/gcpolicy.py) nothing loses sight of them:
    the registry lists and counts them, the policy's live count includes them, an
    eviction ends each cleanly (a DISCONNECT to the broker at a packet boundary),
    and once ended they are freed by their reference counts, frozen or not."""
    import gc

    import gevent

    from bench.dataplane import data_path, relaying
    from gproxy.proxy.session.limits import Slot
    from gproxy.runtime import gcpolicy
    from tests import packets as P
    from tests.integration.test_handover_inprocess import hand_over, recv_soon, wait

    gc.collect()
    gc.disable()
    try:
        old, new = data_path(), data_path()
        ends = [relaying(old, "moved-%d" % i) for i in range(6)]
        for i, (_, _, relay) in enumerate(ends):
            key = ("r", "10.0.0.%d" % i)
            old.proxy.limits.acquire(key)
            relay.cleanup.append(Slot(old.proxy.limits, key))
        ends[0][0].sendall(P.publish("gc/t", b"m" * 3000)[:100])  # moves mid-packet
        gevent.sleep(0.02)
        assert hand_over(old, new) == 6
        policy = gcpolicy.Policy(live=lambda: len(new.registry))
        policy.round()  # collect what is young, freeze the rest: the adopted sessions too
        assert gc.get_freeze_count() > 0
        assert policy.live() == len(new.registry) == 6 and len(old.registry) == 0
        total, listed, _ = new.registry.query()
        assert total == 6 and sorted(i.client_id for i in listed) == sorted(
            "moved-%d" % i for i in range(6))
        job = new.live().evictions.start({})
        ends[0][0].sendall(P.publish("gc/t", b"m" * 3000)[100:])  # its boundary comes
        assert wait(lambda: job.state == "done")
        for client, broker, _ in ends:
            got = b""
            while not got.endswith(P.disconnect(4)):
                chunk = recv_soon(broker)
                assert chunk, "the broker's side ended without a DISCONNECT"
                got += chunk
        assert wait(lambda: len(new.registry) == 0) and new.proxy.limits.conns == {}
        for client, broker, _ in ends:
            client.close()
            broker.close()
        del ends, listed
        gc.unfreeze()
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        kinds = {type(o).__name__ for o in gc.garbage}
        gc.set_debug(0)
        del gc.garbage[:]
        assert not (PER_SESSION | {"Slot", "Counted"}) & kinds, kinds
    finally:
        gc.unfreeze()
        gc.enable()
        for app in ("old", "new"):
            if app in locals():
                locals()[app].proxy.relays.close_all()
