"""``scripts/upgrade_bench.py --short``: the upgrade benchmark runs end to end (300
pinging sessions, a live upgrade, then a plain restart) and its figures hold
together.  The figures themselves are for the full run on a quiet machine
(docs/upgrade.md); here only what must hold anywhere is checked: the live
upgrade moved every session and closed none, the plain restart ended every one
and got them all back.
"""

import pytest

from tests.integration.helpers import run_short

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def test_upgrade_bench_short_mode(tmp_path):
    result = run_short("upgrade_bench.py", tmp_path, timeout=220)
    live, plain = result["live_upgrade"], result["plain_restart"]
    assert result["sessions"] == live["moved"] == 300 and live["closed"] == 0
    assert live["sessions_pinged_during"] > 0
    pause = live["pause_ms"]
    assert 0 < pause["p50"] <= pause["p99"] <= pause["max"]
    memory = live["memory_kib"]
    assert memory["old_before"] > 0 and memory["new_peak"] > 0
    assert memory["both_peak"] >= max(memory["old_peak"], memory["new_peak"])
    assert plain["sessions_ended"] == 300 and plain["all_back"]
