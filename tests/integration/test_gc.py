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
